"""Letterbox on the GPU: YUV 4:2:0 frames (NVDEC's NV12 in device memory, or a CPU decoder's I420
uploaded) -> the model's uint8 BGR/RGB NHWC input, in one kernel launch per frame.

One fused kernel does what the CPU path does in three steps (swscale to BGR, cv2.resize, pad):
for each output pixel it samples luma and chroma bilinearly at the source position (the same
half-pixel mapping as cv2.resize INTER_LINEAR), converts with the frame's matrix (BT.601 or
BT.709, limited or full range) and writes the padding colour outside the resized area. The
kernel is compiled once per process with NVRTC (part of cuda-python) and launched with the
driver API, so the GPU path needs no other library.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from pipeline.cuda import CudaError, Stream, check_driver, compute_capability, driver_api
from pipeline.record import Letterbox

_SOURCE = r"""
__device__ __forceinline__ float sample(const unsigned char* plane, int pitch, int step, int w, int h, float x, float y) {
    x = fminf(fmaxf(x, 0.f), (float)(w - 1));
    y = fminf(fmaxf(y, 0.f), (float)(h - 1));
    int x0 = (int)x, y0 = (int)y;
    int x1 = min(x0 + 1, w - 1), y1 = min(y0 + 1, h - 1);
    float fx = x - x0, fy = y - y0;
    const unsigned char* r0 = plane + (size_t)y0 * pitch;
    const unsigned char* r1 = plane + (size_t)y1 * pitch;
    float top = r0[x0 * step] + (r0[x1 * step] - r0[x0 * step]) * fx;
    float bottom = r1[x0 * step] + (r1[x1 * step] - r1[x0 * step]) * fx;
    return top + (bottom - top) * fy;
}

__device__ __forceinline__ unsigned char clamp_u8(float v) {
    return (unsigned char)fminf(fmaxf(v + 0.5f, 0.f), 255.f);
}

// u/v: chroma planes (NV12: u = uv, v = uv + 1, chroma_step 2; I420: separate planes, step 1)
// m: yuv->rgb matrix {y_scale, y_offset, rv, gu, gv, bu}; out: uint8 [dst_h, dst_w, 3]
extern "C" __global__ void letterbox_yuv420(
    const unsigned char* y_plane, int y_pitch,
    const unsigned char* u_plane, const unsigned char* v_plane, int uv_pitch, int chroma_step,
    int src_w, int src_h,
    unsigned char* out, int dst_w, int dst_h,
    int pad_x, int pad_y, int resized_w, int resized_h,
    float scale_x, float scale_y,
    float y_scale, float y_offset, float rv, float gu, float gv, float bu,
    int pad_value, int rgb_order)
{
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= dst_w || y >= dst_h) return;
    unsigned char* px = out + ((size_t)y * dst_w + x) * 3;
    int rx = x - pad_x, ry = y - pad_y;
    if (rx < 0 || ry < 0 || rx >= resized_w || ry >= resized_h) {
        px[0] = px[1] = px[2] = (unsigned char)pad_value;
        return;
    }
    float sx = (rx + 0.5f) * scale_x - 0.5f;
    float sy = (ry + 0.5f) * scale_y - 0.5f;
    float luma = (sample(y_plane, y_pitch, 1, src_w, src_h, sx, sy) - y_offset) * y_scale;
    int cw = (src_w + 1) / 2, ch = (src_h + 1) / 2;
    float cx = (sx + 0.5f) * 0.5f - 0.5f, cy = (sy + 0.5f) * 0.5f - 0.5f;
    float u = sample(u_plane, uv_pitch, chroma_step, cw, ch, cx, cy) - 128.f;
    float v = sample(v_plane, uv_pitch, chroma_step, cw, ch, cx, cy) - 128.f;
    float r = luma + rv * v, g = luma - gu * u - gv * v, b = luma + bu * u;
    if (rgb_order) { px[0] = clamp_u8(r); px[1] = clamp_u8(g); px[2] = clamp_u8(b); }
    else           { px[0] = clamp_u8(b); px[1] = clamp_u8(g); px[2] = clamp_u8(r); }
}
"""

# (rv, gu, gv, bu) per matrix; limited range scales luma by 255/219 and chroma by 255/224
_MATRICES = {
    "bt601": (1.402, 0.344136, 0.714136, 1.772),
    "bt709": (1.5748, 0.187324, 0.468124, 1.8556),
}


def yuv_coefficients(matrix: str, full_range: bool) -> tuple[float, ...]:
    """(y_scale, y_offset, rv, gu, gv, bu) for the kernel."""
    rv, gu, gv, bu = _MATRICES[matrix]
    if full_range:
        return 1.0, 0.0, rv, gu, gv, bu
    c = 255.0 / 224.0
    return 255.0 / 219.0, 16.0, rv * c, gu * c, gv * c, bu * c


def frame_matrix(av_frame) -> tuple[str, bool]:
    """The frame's colour matrix and range as FFmpeg reports them (AVColorSpace 1 = BT.709,
    AVColorRange 2 = full); anything else is taken as BT.601 limited, swscale's default."""
    colorspace = int(getattr(av_frame, "colorspace", 2) or 2)
    color_range = int(getattr(av_frame, "color_range", 0) or 0)
    return ("bt709" if colorspace == 1 else "bt601"), color_range == 2


def compile_kernel(arch: tuple[int, int]) -> bytes:
    """CUBIN of the letterbox kernel for one compute capability (NVRTC)."""
    from cuda.bindings import nvrtc

    def ok(result, call):
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CudaError(f"{call} failed: {nvrtc.nvrtcGetErrorString(err)[1].decode()}")
        return values[0] if values else None

    program = ok(nvrtc.nvrtcCreateProgram(_SOURCE.encode(), b"letterbox.cu", 0, [], []), "nvrtcCreateProgram")
    try:
        options = [f"--gpu-architecture=sm_{arch[0]}{arch[1]}".encode(), b"--use_fast_math", b"-std=c++17"]
        result = nvrtc.nvrtcCompileProgram(program, len(options), options)
        if result[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            size = ok(nvrtc.nvrtcGetProgramLogSize(program), "nvrtcGetProgramLogSize")
            text = b" " * size
            nvrtc.nvrtcGetProgramLog(program, text)
            raise CudaError(f"letterbox kernel does not compile: {text.decode(errors='replace').strip()}")
        size = ok(nvrtc.nvrtcGetCUBINSize(program), "nvrtcGetCUBINSize")
        cubin = b" " * size
        ok(nvrtc.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN")
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(program)


@functools.lru_cache(maxsize=None)
def _kernel(device: int):
    driver = driver_api()
    cubin = compile_kernel(compute_capability(device))
    module = check_driver(driver.cuModuleLoadData(cubin), "cuModuleLoadData")
    return module, check_driver(driver.cuModuleGetFunction(module, b"letterbox_yuv420"), "cuModuleGetFunction")


_ARG_TYPES = (ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
              ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
              ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_float,
              *(ctypes.c_float,) * 6, ctypes.c_int, ctypes.c_int)


class YuvPlanes:
    """Device pointers and pitches of one YUV 4:2:0 image (NV12: `v_ptr = u_ptr + 1`, step 2)."""

    __slots__ = ("width", "height", "y_ptr", "y_pitch", "u_ptr", "v_ptr", "uv_pitch", "chroma_step", "matrix",
                 "full_range")

    def __init__(self, width, height, y_ptr, y_pitch, u_ptr, v_ptr, uv_pitch, chroma_step, matrix="bt601",
                 full_range=False):
        self.width, self.height = width, height
        self.y_ptr, self.y_pitch = y_ptr, y_pitch
        self.u_ptr, self.v_ptr, self.uv_pitch, self.chroma_step = u_ptr, v_ptr, uv_pitch, chroma_step
        self.matrix, self.full_range = matrix, full_range

    @classmethod
    def from_nv12_frame(cls, av_frame) -> "YuvPlanes":
        """A PyAV frame decoded by NVDEC and kept on the device (`HWAccel(is_hw_owned=True)`)."""
        y, uv = av_frame.planes[0], av_frame.planes[1]
        matrix, full = frame_matrix(av_frame)
        return cls(av_frame.width, av_frame.height, y.buffer_ptr, y.line_size, uv.buffer_ptr, uv.buffer_ptr + 1,
                   uv.line_size, 2, matrix, full)


def i420_layout(width: int, height: int) -> tuple[tuple[int, int, int], tuple[tuple[int, int], ...]]:
    """Byte offsets and (width, height) of the Y, U and V planes of an I420 image packed without
    padding (the upload's staging buffer). Chroma is ceil(w/2) x ceil(h/2), as FFmpeg lays it out:
    an odd-sized frame keeps its last chroma column and row, where the kernel reads them."""
    cw, ch = (width + 1) // 2, (height + 1) // 2
    return (0, width * height, width * height + cw * ch), ((width, height), (cw, ch), (cw, ch))


class GpuLetterboxer:
    """Launches the letterbox kernel for one image into a row of a device batch buffer.

    `dst_hw` is the largest target (the model's square); a launch may target a smaller one, the
    rectangle of the batch it writes (rectangle letterboxing), whose rows are `dst_h * dst_w * 3`
    bytes apart.
    """

    block = (32, 8, 1)

    def __init__(self, device: int, dst_hw: tuple[int, int], rgb_order: bool, pad_value: int):
        self.function = _kernel(device)[1]
        self.dst_h, self.dst_w = dst_hw
        self.rgb_order = int(rgb_order)
        self.pad_value = int(pad_value)
        self.grid = ((self.dst_w + self.block[0] - 1) // self.block[0], (self.dst_h + self.block[1] - 1) // self.block[1], 1)

    def launch(self, planes: YuvPlanes, dst_ptr: int, geo: Letterbox, stream: Stream,
               dst_hw: tuple[int, int] | None = None) -> None:
        coefficients = yuv_coefficients(planes.matrix, planes.full_range)
        dst_h, dst_w = dst_hw or (self.dst_h, self.dst_w)
        if dst_h > self.dst_h or dst_w > self.dst_w:
            raise ValueError(f"letterbox target {dst_h}x{dst_w} is larger than {self.dst_h}x{self.dst_w}")
        grid = ((dst_w + self.block[0] - 1) // self.block[0], (dst_h + self.block[1] - 1) // self.block[1], 1)
        args = (planes.y_ptr, planes.y_pitch, planes.u_ptr, planes.v_ptr, planes.uv_pitch, planes.chroma_step,
                planes.width, planes.height, dst_ptr, dst_w, dst_h,
                geo.pad_x, geo.pad_y, geo.resized_w, geo.resized_h,
                planes.width / geo.resized_w, planes.height / geo.resized_h,
                *coefficients, self.pad_value, self.rgb_order)
        check_driver(driver_api().cuLaunchKernel(self.function, *grid, *self.block, 0, stream.ptr, (args, _ARG_TYPES), 0),
                      "cuLaunchKernel(letterbox_yuv420)")


def cpu_reference(y: np.ndarray, u: np.ndarray, v: np.ndarray, dst_hw: tuple[int, int], geo: Letterbox,
                  matrix: str = "bt601", full_range: bool = False, pad_value: int = 114) -> np.ndarray:
    """The kernel's arithmetic in numpy (I420 planes): what its GPU test compares against."""
    dst_h, dst_w = dst_hw
    out = np.full((dst_h, dst_w, 3), pad_value, np.uint8)
    h, w = y.shape
    sx = (np.arange(geo.resized_w) + 0.5) * (w / geo.resized_w) - 0.5
    sy = (np.arange(geo.resized_h) + 0.5) * (h / geo.resized_h) - 0.5

    def sample(plane, xs, ys):
        ph, pw = plane.shape
        xs = np.clip(xs, 0, pw - 1)
        ys = np.clip(ys, 0, ph - 1)
        x0 = xs.astype(np.int64)
        y0 = ys.astype(np.int64)
        x1 = np.minimum(x0 + 1, pw - 1)
        y1 = np.minimum(y0 + 1, ph - 1)
        fx = (xs - x0)[None, :]
        fy = (ys - y0)[:, None]
        p = plane.astype(np.float32)
        top = p[y0][:, x0] + (p[y0][:, x1] - p[y0][:, x0]) * fx
        bottom = p[y1][:, x0] + (p[y1][:, x1] - p[y1][:, x0]) * fx
        return top + (bottom - top) * fy

    y_scale, y_offset, rv, gu, gv, bu = yuv_coefficients(matrix, full_range)
    luma = (sample(y, sx, sy) - y_offset) * y_scale
    cu = sample(u, (sx + 0.5) * 0.5 - 0.5, (sy + 0.5) * 0.5 - 0.5) - 128
    cv = sample(v, (sx + 0.5) * 0.5 - 0.5, (sy + 0.5) * 0.5 - 0.5) - 128
    bgr = np.stack([luma + bu * cu, luma - gu * cu - gv * cv, luma + rv * cv], axis=-1)
    out[geo.pad_y:geo.pad_y + geo.resized_h, geo.pad_x:geo.pad_x + geo.resized_w] = np.clip(bgr + 0.5, 0, 255).astype(np.uint8)
    return out
