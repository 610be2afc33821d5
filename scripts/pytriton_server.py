#!/usr/bin/env python3
"""A real Triton Inference Server on any machine, serving a model repository that
`run.py export-triton` wrote (the tests and bench/bench_triton.py start it).

PyPI's nvidia-pytriton bundles a real `tritonserver` binary with the Python backend only, so
the repository's `model.onnx` runs in ONNX Runtime inside a PyTriton bound function (one ONNX
Runtime session per instance of the repository's `instance_group`), under the repository's
model name, batch size and dynamic batcher. Everything the pipeline does against a Triton
(gRPC, system shared memory, the access-token header) goes through the real server.

It needs numpy<2 and Debian's Python, so it runs from its own virtualenv (scripts/triton_venv.sh):

    .venv-triton/bin/python scripts/pytriton_server.py --repository DIR --model NAME [--model NAME2] \
        --grpc-port 8001 --http-port 8000 --metrics-port 8002 [--token TOKEN]

It prints `ready` once the models are loaded and serves until SIGTERM/SIGINT. With --token the
shared-memory, repository and statistics APIs need the header `triton-access-token: TOKEN`
(PyTriton's default protection; without --token a random token is made, which locks clients
out of shared memory).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv-triton" / "bin" / "python"  # made by scripts/triton_venv.sh


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PyTritonServer:
    """This script in a subprocess (its own process group), for tests and benchmarks: start it, kill it
    (the server and its model processes at once, as a crash would), start it again on the same ports."""

    def __init__(self, repository: Path, model: str | list[str], workspace: Path, token: str | None = None):
        self.repository, self.workspace, self.token = Path(repository), Path(workspace), token
        self.models = [model] if isinstance(model, str) else list(model)
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.process = None
        self.log = self.workspace / "server.log"
        self.starts = 0

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @staticmethod
    def unavailable() -> str | None:
        """Why the server cannot run here (None when it can)."""
        if not VENV_PYTHON.exists() or not any(VENV_PYTHON.parent.parent.glob(".installed-*")):
            return f"{VENV_PYTHON.parent.parent.relative_to(ROOT)} is missing or incomplete (bash scripts/triton_venv.sh makes it)"
        return None

    def start(self, timeout: float = 90.0) -> "PyTritonServer":
        import select
        import subprocess
        import time

        self.starts += 1
        workspace = self.workspace / f"run{self.starts}"  # a killed server leaves its workspace behind
        self.workspace.mkdir(parents=True, exist_ok=True)
        args = [str(VENV_PYTHON), str(Path(__file__).resolve()), "--repository", str(self.repository),
                *(arg for name in self.models for arg in ("--model", name)), "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
                "--metrics-port", str(self.metrics_port), "--workspace", str(workspace)]
        if self.token:
            args += ["--token", self.token]
        log = open(self.log, "a", encoding="utf-8")
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True, process_group=0)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not select.select([self.process.stdout], [], [], 0.5)[0]:  # a hung start must not block past the deadline
                if self.process.poll() is not None:
                    break
                continue
            line = self.process.stdout.readline()
            if line.startswith("ready"):
                # keep reading its stdout into the log, or a full pipe would block the server one day
                threading.Thread(target=_drain, args=(self.process.stdout, self.log), daemon=True).start()
                return self
            if not line and self.process.poll() is not None:
                break
        self.kill()
        tail = self.log.read_text(encoding="utf-8", errors="replace")[-1500:]
        raise RuntimeError(f"PyTriton server did not get ready within {timeout:.0f} s: {tail}")

    def start_retrying(self, timeout: float = 90.0, attempts: int = 2) -> "PyTritonServer":
        """`start`, once more if the first start hangs (seen once on a loaded 2-core machine: models never
        reported ready); the second attempt's failure is raised."""
        for attempt in range(attempts):
            try:
                return self.start(timeout)
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                with open(self.log, "a", encoding="utf-8") as log:
                    log.write(f"--- start attempt {attempt + 1} timed out after {timeout:.0f} s; starting again\n")
        return self

    def kill(self) -> None:
        """SIGKILL to the whole group: tritonserver, its Python backend stubs and the model process."""
        import os
        import signal

        if self.process is None:
            return
        segments = self._shared_memory_files()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # SIGKILL ends stopped processes too
        except ProcessLookupError:
            pass
        self.process.wait(10)
        self.process.stdout.close()
        self.process = None
        for path in segments:  # a killed PyTriton leaves its tensor store's segments behind: ~20 MB a kill
            try:
                path.unlink()
            except OSError:
                pass

    def _group(self) -> list[Path]:
        """/proc entries of the server's processes (its process group)."""
        import os

        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if os.getpgid(int(proc.name)) == self.process.pid:
                    found.append(proc)
            except (OSError, ProcessLookupError):
                continue
        return found

    def _shared_memory_files(self) -> list[Path]:
        """/dev/shm files the server's processes map, except the pipeline's own regions (vapipe_*,
        registered with the server: their owner unlinks them)."""
        found = set()
        for proc in self._group():
            try:
                maps = (proc / "maps").read_text()
            except (OSError, ProcessLookupError):
                continue
            for line in maps.splitlines():
                path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
                if path.startswith("/dev/shm/") and not path.startswith("/dev/shm/vapipe_"):
                    found.add(Path(path.removesuffix(" (deleted)")))
        return sorted(found)

    def freeze(self) -> None:
        """SIGSTOP to the tritonserver process: a server that hangs (its connections stay open, nothing
        answers). A real Triton runs the model in that process (the onnxruntime backend), so stopping
        it is what a hung server is. PyTriton's Python-backend stubs and its proxy processes are left
        running: stopped together with it under load they do not come back (a stub's call to PyTriton's
        tensor store fails with BrokenPipe after SIGCONT, then tritonserver aborts on a
        boost::interprocess::lock_exception), which turns the hang into a crash of the test server."""
        import os
        import signal

        if self.process is None:
            return
        servers = [int(p.name) for p in self._group() if _comm(p) == "tritonserver"]
        if not servers:
            raise RuntimeError("PyTriton server: no tritonserver process to freeze")
        for pid in servers:
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        import os
        import signal

        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, as an operator stops it; SIGKILL after `timeout`."""
        import os
        import signal
        import subprocess

        if self.process is None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


def _comm(proc: Path) -> str:
    try:
        return (proc / "comm").read_text().strip()
    except OSError:
        return ""


def _drain(stream, log: Path) -> None:
    with open(log, "a", encoding="utf-8") as out:
        for line in stream:
            out.write(line)


def read_model_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", required=True, type=Path)
    parser.add_argument("--model", required=True, action="append", help="a model of the repository; repeat for several")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--token", help="access token for the protected APIs (shared memory among them)")
    parser.add_argument("--workspace", type=Path, help="PyTriton's workspace (sockets, model store)")
    args = parser.parse_args()

    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    def make_infer(session):
        output_names = [o.name for o in session.get_outputs()]
        input_name = session.get_inputs()[0].name

        @batch
        def infer(**inputs):
            (images,) = inputs.values()
            return dict(zip(output_names, session.run(None, {input_name: images})))

        return infer

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one single-threaded session per instance, as the pipeline's lanes
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    dtypes = {1: np.bool_, 2: np.uint8, 8: np.int32, 9: np.int64, 11: np.float32, 10: np.float16}

    def tensors(entries):
        return [Tensor(name=e.name, dtype=dtypes[e.data_type], shape=tuple(e.dims)) for e in entries]

    def binding(name: str) -> dict:
        """bind()'s arguments for one model of the repository."""
        folder = args.repository / name
        config = read_model_config(folder / "config.pbtxt")
        versions = sorted((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        onnx_path = versions[-1] / (config.default_model_filename or "model.onnx")
        instances = sum(group.count or 1 for group in config.instance_group) or 1
        sessions = [ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"]) for _ in range(instances)]
        batcher = DynamicBatcher(max_queue_delay_microseconds=config.dynamic_batching.max_queue_delay_microseconds)
        model_config = ModelConfig(batching=config.max_batch_size > 0, max_batch_size=max(config.max_batch_size, 1),
                                   batcher=batcher)
        return dict(model_name=name, infer_func=[make_infer(s) for s in sessions], inputs=tensors(config.input),
                    outputs=tensors(config.output), config=model_config, strict=False)

    triton_config = TritonConfig(grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port,
                                 grpc_address="127.0.0.1", http_address="127.0.0.1", metrics_address="127.0.0.1")
    security = TritonSecurityConfig(access_token=args.token) if args.token else None
    triton = Triton(config=triton_config, workspace=args.workspace, security_config=security)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with triton:
        for name in args.model:
            triton.bind(**binding(name))
        triton.run()
        print("ready", flush=True)
        while not stop.wait(0.5) and triton.is_alive():
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
