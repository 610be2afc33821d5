"""Thin, checked wrappers over CUDA's runtime API (cuda-python's `cuda.bindings.runtime`).

Pinned host memory, device memory, streams, events and async copies for the GPU data path. Every
call's status is checked and turned into a `CudaError` that names the call and CUDA's message.
The module imports on machines without CUDA; `available()` says whether a GPU can be used.
"""

from __future__ import annotations

import ctypes
import functools
import time

import numpy as np

from pipeline.errors import PipelineError


class CudaError(PipelineError):
    pass


@functools.lru_cache(maxsize=1)
def _rt():
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6 layout
        except ImportError:
            raise CudaError("the GPU data path needs cuda-python: pip install -r requirements-gpu.txt") from None
    return runtime


def check(result, call: str = "CUDA call"):
    """Unpack a cuda-python result tuple, raising `CudaError` unless it is cudaSuccess."""
    rt = _rt()
    if isinstance(result, tuple):
        err, *values = result
    else:
        err, values = result, []
    if err != rt.cudaError_t.cudaSuccess:
        _, name = rt.cudaGetErrorName(err)
        _, text = rt.cudaGetErrorString(err)
        raise CudaError(f"{call} failed: {name.decode()} ({text.decode()})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def available() -> bool:
    try:
        return (check(_rt().cudaGetDeviceCount(), "cudaGetDeviceCount") or 0) > 0
    except CudaError:
        return False


def device_name(device: int = 0) -> str:
    props = check(_rt().cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")


def compute_capability(device: int = 0) -> tuple[int, int]:
    props = check(_rt().cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    return props.major, props.minor


@functools.lru_cache(maxsize=None)
def _share_primary_context(device: int) -> None:
    """Give the device's primary context the flags FFmpeg asks for (blocking sync), so NVDEC decodes
    into the same context as the engine; FFmpeg refuses an active primary context with other flags."""
    try:
        driver = driver_api()
        result = driver.cuInit(0)
    except Exception as exc:  # no driver library on this machine
        raise CudaError(f"no usable CUDA driver: {str(exc).splitlines()[0][:160]}") from None
    check_driver(result, "cuInit")
    handle = check_driver(driver.cuDeviceGet(device), f"cuDeviceGet({device})")
    check_driver(driver.cuDevicePrimaryCtxSetFlags(handle, driver.CUctx_flags.CU_CTX_SCHED_BLOCKING_SYNC),
                 f"cuDevicePrimaryCtxSetFlags(device {device})")


def driver_api():
    from cuda.bindings import driver

    return driver


def check_driver(result, call: str):
    """`check` for the driver API (cuda.bindings.driver): unpack, or raise `CudaError` naming the call."""
    driver = driver_api()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise CudaError(f"{call} failed: {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


def set_device(device: int) -> None:
    """Make `device` (its primary context) current in this thread."""
    _share_primary_context(device)
    check(_rt().cudaSetDevice(device), f"cudaSetDevice({device})")


class PinnedAllocator:
    """Page-locked host arrays (cudaHostAlloc): DMA-able, so async copies really overlap."""

    def __init__(self):
        self._owned: list[int] = []

    def __call__(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        ptr = check(_rt().cudaHostAlloc(nbytes, _rt().cudaHostAllocDefault), f"cudaHostAlloc({nbytes} bytes)")
        self._owned.append(int(ptr))
        buffer = (ctypes.c_uint8 * nbytes).from_address(int(ptr))
        return np.frombuffer(buffer, dtype=dtype).reshape(shape)

    def free(self) -> None:
        while self._owned:
            _rt().cudaFreeHost(self._owned.pop())


class DeviceBuffer:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.ptr = int(check(_rt().cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes} bytes)"))

    def free(self) -> None:
        if self.ptr:
            _rt().cudaFree(self.ptr)
            self.ptr = 0


class DeviceArray:
    """A device allocation seen as an array: pointer, shape and dtype (no data access from the host)."""

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype):
        self.ptr, self.shape, self.dtype = ptr, tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize

    def row_ptr(self, row: int) -> int:
        return self.ptr + row * (self.nbytes // self.shape[0])


class DeviceAllocator:
    """Device memory for slot pools (`pipeline.buffers`): the GPU letterbox's batch buffers."""

    def __init__(self):
        self._owned: list[DeviceBuffer] = []

    def __call__(self, shape: tuple[int, ...], dtype: np.dtype) -> DeviceArray:
        buffer = DeviceBuffer(int(np.prod(shape)) * np.dtype(dtype).itemsize)
        self._owned.append(buffer)
        return DeviceArray(buffer.ptr, shape, dtype)

    def free(self) -> None:
        while self._owned:
            self._owned.pop().free()


class Stream:
    def __init__(self, blocking: bool = False):
        # a blocking stream also waits for the legacy default stream, where FFmpeg's NVDEC copies run
        flags = _rt().cudaStreamDefault if blocking else _rt().cudaStreamNonBlocking
        self.handle = check(_rt().cudaStreamCreateWithFlags(flags), "cudaStreamCreateWithFlags")
        self.ptr = int(self.handle)

    def synchronize(self) -> None:
        check(_rt().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def destroy(self) -> None:
        if self.handle is not None:
            _rt().cudaStreamDestroy(self.handle)
            self.handle = None


class Event:
    def __init__(self):
        self.handle = check(_rt().cudaEventCreate(), "cudaEventCreate")

    def record(self, stream: Stream) -> None:
        check(_rt().cudaEventRecord(self.handle, stream.handle), "cudaEventRecord")

    def synchronize(self) -> None:
        check(_rt().cudaEventSynchronize(self.handle), "cudaEventSynchronize")

    def done(self) -> bool:
        err = _rt().cudaEventQuery(self.handle)
        err = err[0] if isinstance(err, tuple) else err
        if err == _rt().cudaError_t.cudaErrorNotReady:
            return False
        check(err, "cudaEventQuery")
        return True

    def wait(self, poll_s: float = 0.0002) -> None:
        """Wait for the event while letting other Python threads run.

        A blocking cudaEventSynchronize may keep the GIL for the whole wait, which stalls every
        other stage while the GPU works; polling with a short sleep releases it.
        """
        while not self.done():
            time.sleep(poll_s)

    def since(self, earlier: "Event") -> float:
        """Milliseconds from `earlier` to this event (both must have completed)."""
        return float(check(_rt().cudaEventElapsedTime(earlier.handle, self.handle), "cudaEventElapsedTime"))

    def destroy(self) -> None:
        if self.handle is not None:
            _rt().cudaEventDestroy(self.handle)
            self.handle = None


def copy_to_device(dst_ptr: int, src: np.ndarray, nbytes: int, stream: Stream) -> None:
    rt = _rt()
    check(rt.cudaMemcpyAsync(dst_ptr, src.ctypes.data, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle),
          "cudaMemcpyAsync(host to device)")


def copy_to_host(dst: np.ndarray, src_ptr: int, nbytes: int, stream: Stream) -> None:
    rt = _rt()
    check(rt.cudaMemcpyAsync(dst.ctypes.data, src_ptr, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle),
          "cudaMemcpyAsync(device to host)")


def copy_device_to_device(dst_ptr: int, src_ptr: int, nbytes: int, stream: Stream) -> None:
    rt = _rt()
    check(rt.cudaMemcpyAsync(dst_ptr, src_ptr, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream.handle),
          "cudaMemcpyAsync(device to device)")


def copy_2d_to_device(dst_ptr: int, dst_pitch: int, src_ptr: int, src_pitch: int, width: int, height: int,
                      stream: Stream) -> None:
    """A pitched host image (a decoded plane, pageable) into device memory."""
    rt = _rt()
    check(rt.cudaMemcpy2DAsync(dst_ptr, dst_pitch, src_ptr, src_pitch, width, height,
                               rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle), "cudaMemcpy2DAsync(host to device)")


def copy_2d_to_host(dst: np.ndarray, src_ptr: int, src_pitch: int, width: int, height: int) -> None:
    """A pitched device image into a contiguous host array (synchronous: previews only)."""
    rt = _rt()
    check(rt.cudaMemcpy2D(dst.ctypes.data, width, src_ptr, src_pitch, width, height,
                          rt.cudaMemcpyKind.cudaMemcpyDeviceToHost), "cudaMemcpy2D(device to host)")
