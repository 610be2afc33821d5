#!/usr/bin/env python3
"""Streaming video analytics: decode -> letterbox -> infer -> detections over ZeroMQ.

    python run.py --config configs/demo.yaml          run the pipeline
    python run.py subscribe --camera demo             print the detections a camera publishes
    python run.py view --camera demo                  watch a camera: preview frames with detections drawn
    python run.py export-triton --config X --out DIR  write a Triton model repository for engine.kind triton

Exit codes: 0 done; 1 the run failed after it started; 2 something to fix before it can run (the
config, the model, a video, an argument, the endpoint); 130 a second Ctrl-C (stopped at once).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import math
import os
import sys
import threading

from pipeline.errors import PipelineError, UsageError

log = logging.getLogger("pipeline")


def _setup_logging(level: str, tag: str = "") -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format=f"%(asctime)s %(levelname)s {tag}%(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas before the stage threads start.

    glibc gives busy threads arenas of their own (up to 8 per core); with decoder, stage and
    reconnect threads the process's memory crept up by ~4 MB a minute in the soak, and stayed
    flat with 2 arenas (bench/results/soak*.md). MALLOC_ARENA_MAX in the environment wins.
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc (musl, say): nothing to tune


def cmd_run(args) -> int:
    from pipeline.shutdown import StopSignals, SupervisorChannel, load_interruptibly

    # first thing, before anything slow: what a signal means (pipeline/shutdown.py, README: Shutdown and signals)
    stop_requested = threading.Event()
    channel = signals = None
    if args.worker:  # a worker takes orders from its supervisor only
        channel = SupervisorChannel(stop_requested).start()
    else:
        signals = StopSignals(stop_requested).install()
    from pipeline.config import load_config

    config = load_config(args.config)
    worker = None
    if args.worker:
        from pipeline.workers import worker_config

        index, count = args.worker
        worker = index
        config = worker_config(config, index, count)
    _setup_logging(args.log_level or config.runtime.log_level, f"[worker {worker}] " if worker is not None else "")
    _limit_malloc_arenas()
    if config.cluster is not None and not args.check:  # fleet mode: this host's share of the cameras
        from pipeline.fleet import run_fleet

        return run_fleet(config, args.summary_json, stop_requested)
    if config.runtime.workers and not args.check:
        from pipeline.workers import run_workers

        return run_workers(config, args.config, args.summary_json, args.log_level, stop_requested, signals)
    from pipeline.cameras import LocalCameras, WorkerControl
    from pipeline.graph import Pipeline  # builds model, engine and socket: everything but the run

    # the control plane first, so /healthz answers and /readyz says "loading" while the model loads
    cameras = LocalCameras(config)
    service = server = None
    if args.control:  # a worker: its supervisor asks (metrics, cameras, changes) over this socket
        WorkerControl(args.control, cameras, worker)
    elif not args.check:
        from pipeline.service import start_control_plane  # aiohttp: not imported by workers (a second to start)

        service, server = start_control_plane(config, args.config, cameras)
    deadline = config.runtime.shutdown_deadline_s
    try:
        pipeline = load_interruptibly(lambda: Pipeline(config, publish_connect=args.publish_connect), stop_requested, deadline)
    except BaseException:
        if server is not None:
            server.stop()
        raise
    if args.check:
        pipeline.close()
        print(f"{args.config}: ok")
        return 0
    cameras.pipeline = pipeline
    if service is not None:
        service.curve = pipeline.curve  # SIGHUP re-reads the admitted subscriber keys too
    log.info("running %d camera(s) with %s, batch <= %d, publishing on %s", len(config.cameras),
             pipeline.engine.name, pipeline.engine.max_batch, pipeline.endpoint)
    subscribers = reports = None
    # every camera opened and its first frame held (runtime.preroll_timeout_s), so that all start together
    pipeline.preroll(stop_requested)
    if worker is not None:
        # say ready (model loaded, lanes built, cameras prerolled) and wait for the go, which comes once
        # every worker is ready: cameras started early would build a backlog while the others load
        from pipeline.workers import WorkerReports, ready_delay_for_tests

        if ready_delay_for_tests(worker):
            stop_requested.wait(ready_delay_for_tests(worker))
        if args.reports:
            reports = WorkerReports(args.reports, worker, min(1.0, config.runtime.worker_silence_s / 4))
            reports.ready()
        go = channel.wait_go()
        if config.publish.wait_subscribers:
            # the supervisor counts the subscribers at its endpoint; its proxy passes each topic on
            # once, so this worker then waits only until a subscription has reached it
            subscribers = min(1, channel.subscribers) if go else 0
    pipeline.start(stop_requested, subscribers)
    drained = pipeline.wait(stop_requested=stop_requested)
    blocked = pipeline.join_sources(timeout=0.5)
    if blocked:  # a reader in a network read returns within its read timeout; do not wait for it
        log.warning("camera(s) %s: reader still in a network read at exit; abandoned", ", ".join(blocked))
    summary = pipeline.snapshot()
    log.info("done: %s", pipeline.status_line())
    if service is not None:
        service.close()
    if server is not None:
        server.stop()
    pipeline.close()  # the publisher's last messages leave here (within the shutdown deadline)
    if reports is not None:
        reports.close()
    if pipeline.sinks:  # as they stand once the brokers had the deadline for what was buffered
        summary["sinks"] = {sink.name: sink.snapshot() for sink in pipeline.sinks}
    # what is still running besides this thread (stray threads are a bug; a blocked reader is named above)
    summary["threads_alive"] = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    if args.summary_json:
        with open(args.summary_json, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2, default=str)
    failure = pipeline.failure()
    if failure is not None:
        if isinstance(failure, PipelineError):
            raise failure
        return 1
    if not drained:  # logged by Pipeline.wait, naming the stages still running
        return 1
    return 0


def cmd_export_triton(args) -> int:
    """Write a Triton model repository serving exactly what engine.kind triton sends and expects."""
    from engines.triton_engine import import_tritonclient
    from engines.triton_repository import default_model_name, write_repository
    from pipeline.config import load_config
    from pipeline.model import prepare_model

    _setup_logging(args.log_level or "info")
    config = load_config(args.config)
    import_tritonclient()  # the repository's config.pbtxt is Triton's own protobuf, from tritonclient
    model = prepare_model(config.model.path, config.model.preset, config.engine.max_batch)
    name = args.name or config.engine.triton.model_name or default_model_name(config.model.path)
    folder = write_repository(model, args.out, name, config.engine.max_batch, args.instances or config.engine.lanes,
                              args.queue_delay_us, "KIND_GPU" if args.gpu else "KIND_CPU")
    print(f"{folder}: model {name!r} (onnxruntime backend, uint8 [N, {model.input_hw[0]}, {model.input_hw[1]}, 3] "
          f"input, batch <= {config.engine.max_batch if model.batch_dynamic else 1}); serve it with: "
          f"tritonserver --model-repository {os.path.abspath(args.out)}")
    if args.tensorrt:  # the same model as a TensorRT plan, built here by the tensorrt engine
        from engines.tensorrt_engine import TensorRTEngine, import_tensorrt
        from pipeline.errors import UsageError

        try:
            import_tensorrt()
        except PipelineError:
            raise UsageError("export-triton --tensorrt: TensorRT is not installed here (the onnxruntime model was "
                             "written); build the plan where TensorRT and the server's GPU are") from None
        engine_config = config.engine
        engine = TensorRTEngine(model, engine_config.max_batch, 1, fp16=engine_config.fp16,
                                workspace_mb=engine_config.workspace_mb, cache_dir=engine_config.plan_cache_dir,
                                plugins=engine_config.plugins, min_batch=engine_config.min_batch,
                                opt_batch=engine_config.opt_batch, device=engine_config.device)
        plan = engine.plan_path.read_bytes()
        engine.close()
        folder = write_repository(model, args.out, f"{name}_tensorrt", engine_config.max_batch,
                                  args.instances or engine_config.lanes, args.queue_delay_us, "KIND_GPU", plan=plan)
        print(f"{folder}: model '{name}_tensorrt' (tensorrt backend, {'fp16' if engine_config.fp16 else 'fp32'}, "
              f"TensorRT {engine.trt.__version__}: the server's TensorRT must be this version)")
    return 0


def cmd_subscribe(args) -> int:
    import zmq

    from stages.publish import topic_for

    _setup_logging(args.log_level or "info")
    from pipeline.keys import secure_client

    socket = zmq.Context.instance().socket(zmq.SUB)
    try:
        secure_client(socket, args.server_key, args.client_key)
    except UsageError:
        socket.close(0)
        raise
    try:
        socket.connect(args.connect)
    except zmq.ZMQError as exc:
        socket.close(0)
        raise UsageError(f"subscribe --connect {args.connect}: {exc.strerror} (expected tcp://HOST:PORT or ipc://PATH)") from None
    topics = [topic_for(args.prefix, c) for c in args.camera] if args.camera else [f"{args.prefix}/".encode()]
    for topic in topics:
        socket.setsockopt(zmq.SUBSCRIBE, topic)
    last_seq: dict[str, int] = {}
    lost = 0
    received = 0
    try:
        while args.count is None or received < args.count:
            if not socket.poll(int(args.timeout * 1000) if args.timeout else None):
                log.error("subscribe: no message for %.1f s from %s", args.timeout, args.connect)
                return 1
            _topic, header = socket.recv_multipart()[:2]
            message = json.loads(header)
            camera = message.get("camera", "?")
            if camera in last_seq and message.get("seq", 0) > last_seq[camera] + 1:
                lost += message["seq"] - last_seq[camera] - 1
            last_seq[camera] = message.get("seq", 0)
            received += 1
            if args.summary:
                print(summary_line(message), flush=True)
            else:
                print(json.dumps(message), flush=True)
    except KeyboardInterrupt:
        pass
    if lost:
        log.warning("subscribe: %d message(s) lost in transport (gaps in seq)", lost)
    return 0


def cmd_fleet(args) -> int:
    """`run.py fleet status --config X`: who holds which camera (fleet mode, README: Many servers)."""
    import redis

    from pipeline.config import load_config
    from pipeline.fleet import fleet_status, format_status
    from stages.source import redact

    _setup_logging(args.log_level or "warning")
    config = load_config(args.config)
    if config.cluster is None:
        raise UsageError(f"fleet status: {args.config} has no cluster section (fleet mode is off)")
    try:
        status = fleet_status(config.cluster, [c.id for c in config.cameras])
    except redis.RedisError as exc:
        print(f"error: cluster.redis: cannot read the fleet from {redact(config.cluster.redis)}: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else format_status(status))


def cmd_keys(args) -> int:
    from pipeline.keys import make_keys

    written = make_keys(args.dir, args.client or ["client"])
    for path in written:
        print(path)
    if not written:
        print(f"{args.dir}: every key asked for exists already (nothing overwritten)")
    print(f"publisher: publish.keys: {{server: {args.dir}/server.key_secret, clients: {args.dir}/clients}}\n"
          f"subscriber: --server-key {args.dir}/server.key --client-key {args.dir}/<name>.key_secret")
    return 0


def cmd_view(args) -> int:
    from viewer.app import run_viewer  # OpenCV windows: imported only by the command that needs them

    _setup_logging(args.log_level or "info")
    return run_viewer(args)


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors (exit 2), instead of a usage block and a message."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def summary_line(message: dict) -> str:
    """`subscribe --summary`: one short line a message; a tracked detection shows its id (`person#3`)."""
    camera = message.get("camera", "?")
    if message.get("type") == "detections":
        labels = ", ".join(f"{d['label']}{'#%d' % d['track_id'] if 'track_id' in d else ''} {d['score']:.2f}"
                           for d in message["detections"])
        return f"{camera} frame={message['frame']} lat={message['latency_ms']['total']:.0f}ms [{labels}]"
    # end: its reason; an event (line crossed, zone entered or left): where, which way, which track
    details = [str(message[key]) for key in ("reason", "line", "zone", "direction", "label") if key in message]
    if "track_id" in message:
        details.append(f"#{message['track_id']}")
    return " ".join([camera, str(message.get("type"))] + details)


def _number(kind, low: float, high: float, low_open: bool = False):
    """An argparse type: a finite int or float in [low, high] ((low, high] with low_open)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g} and <= {high:g} (got {text})")
        return value
    return parse


def _worker(text: str) -> tuple[int, int]:
    """--worker I/N: worker I (from 0) of N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (worker I of N, from 0), got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"worker {index} of {count} does not exist (0 <= I < N)")
    return index, count


def _output_file(text: str) -> str:
    """A file to write at the end of a run: its folder must exist now, not only when the run is over."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"folder {folder} does not exist")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    return text


DAY_S = 86400.0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the pipeline (the default command)")
    run.add_argument("--config", required=True, help="YAML configuration file (see README: Configuration)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override runtime.log_level")
    run.add_argument("--summary-json", metavar="PATH", type=_output_file,
                     help="write final statistics (frames, fps, per-stage latency, drops) as JSON")
    run.add_argument("--check", action="store_true", help="validate the config, open every video file, load the model and bind the publisher, then exit")
    run.add_argument("--worker", metavar="I/N", type=_worker, help=argparse.SUPPRESS)  # set by the supervisor (runtime.workers)
    run.add_argument("--publish-connect", metavar="ENDPOINT", help=argparse.SUPPRESS)
    run.add_argument("--control", metavar="ENDPOINT", help=argparse.SUPPRESS)  # a worker's control socket
    run.add_argument("--reports", metavar="ENDPOINT", help=argparse.SUPPRESS)  # a worker's ready and beats
    run.set_defaults(func=cmd_run)

    export = commands.add_parser("export-triton", help="write a Triton model repository for the config's model")
    export.add_argument("--config", required=True, help="YAML configuration file: model.* and engine.max_batch/lanes")
    export.add_argument("--out", required=True, metavar="DIR", help="the model repository folder (created if missing)")
    export.add_argument("--name", help="model name on the server (default: engine.triton.model_name, else model.path's stem)")
    export.add_argument("--instances", type=_number(int, 1, 256), help="model instances (default: engine.lanes)")
    export.add_argument("--gpu", action="store_true", help="instances on the GPU (KIND_GPU); default: CPU")
    export.add_argument("--tensorrt", action="store_true",
                        help="also a TensorRT plan variant, NAME_tensorrt (needs TensorRT and a GPU here; engine.fp16 etc. apply)")
    export.add_argument("--queue-delay-us", type=_number(int, 0, 10_000_000), default=1000,
                        help="dynamic batcher's max queue delay in microseconds (default: %(default)s)")
    export.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    export.set_defaults(func=cmd_export_triton)

    sub = commands.add_parser("subscribe", help="print the messages one or more cameras publish")
    sub.add_argument("--connect", default="tcp://127.0.0.1:5555", help="publisher endpoint (default: %(default)s)")
    sub.add_argument("--camera", action="append", help="camera id; repeat for several; default: all cameras")
    sub.add_argument("--prefix", default="det", help="topic prefix (publish.topic_prefix; default: %(default)s)")
    sub.add_argument("--count", type=_number(int, 1, 1e9), help="exit after this many messages")
    sub.add_argument("--timeout", type=_number(float, 0, DAY_S, low_open=True),
                     help="exit 1 when no message arrives for this many seconds")
    sub.add_argument("--summary", action="store_true", help="one short line per message instead of the JSON header")
    sub.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    _key_arguments(sub)
    sub.set_defaults(func=cmd_subscribe)

    fleet = commands.add_parser("fleet", help="fleet mode: `fleet status` shows which host holds which camera")
    fleet.add_argument("action", choices=["status"])
    fleet.add_argument("--config", required=True, help="the fleet's YAML configuration (its cluster section)")
    fleet.add_argument("--json", action="store_true", help="print JSON instead of tables")
    fleet.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    fleet.set_defaults(func=cmd_fleet)

    view = commands.add_parser("view", help="show cameras' preview frames with their detections drawn (or record them)")
    view.add_argument("--connect", action="append", metavar="ENDPOINT",
                      help="publisher endpoint; repeat for several (default: tcp://127.0.0.1:5555)")
    view.add_argument("--camera", action="append", help="camera id; repeat for several; default: all cameras")
    view.add_argument("--prefix", default="det", help="detections topic prefix (publish.topic_prefix; default: %(default)s)")
    view.add_argument("--preview-prefix", default="preview",
                      help="preview topic prefix (publish.preview.topic_prefix; default: %(default)s)")
    view.add_argument("--headless", action="store_true",
                      help="no windows (implied by --record/--snapshot-dir when DISPLAY is not set)")
    view.add_argument("--record", metavar="FILE.mp4", help="write the annotated frames to a video (.mp4 or .avi); "
                      "with several cameras one file each, FILE-<camera>.mp4")
    view.add_argument("--record-fps", type=_number(float, 0, 240, low_open=True), default=10.0,
                      help="frame rate of the recording (default: %(default)s)")
    view.add_argument("--snapshot-dir", metavar="DIR", help="save annotated frames as DIR/<camera>_<frame>.png")
    view.add_argument("--snapshot-every", type=_number(float, 0, DAY_S), default=1.0, metavar="SECONDS",
                      help="at most one snapshot per camera this often; 0 = every frame shown (default: %(default)s)")
    view.add_argument("--width", type=_number(int, 16, 7680), default=640,
                      help="canvas width when a camera publishes no previews (16 to 7680)")
    view.add_argument("--exit-on-end", action="store_true", help="exit once every camera has sent its end message")
    view.add_argument("--duration", type=_number(float, 0, 365 * DAY_S, low_open=True), metavar="SECONDS",
                      help="exit after this many seconds")
    view.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    _key_arguments(view)
    view.set_defaults(func=cmd_view)

    keys = commands.add_parser("keys", help="make ZeroMQ CURVE keys: the publisher's pair and one per subscriber")
    keys.add_argument("--dir", default="keys", help="folder for the keys (default: %(default)s)")
    keys.add_argument("--client", action="append", default=None, metavar="NAME",
                      help="a subscriber's key pair NAME.key_secret, its public key admitted in clients/; repeat "
                      "for several (default: one named client)")
    keys.set_defaults(func=cmd_keys)
    return parser


def _key_arguments(command) -> None:
    command.add_argument("--server-key", metavar="FILE", help="the publisher's public key (server.key from run.py keys), "
                         "when it has publish.keys")
    command.add_argument("--client-key", metavar="FILE", help="this subscriber's key pair (NAME.key_secret), admitted "
                         "by the publisher's clients folder")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv in (["-h"], ["--help"]):  # the full reference: every command and every flag
        print(parser.format_help())
        for name, sub in parser._subparsers._group_actions[0].choices.items():
            print(f"\n=== run.py {name} ===\n{sub.format_help()}")
        return 0
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "run")  # `run.py --config X` means `run.py run --config X`
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
