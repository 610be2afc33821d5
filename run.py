#!/usr/bin/env python3
"""Streaming video analytics: decode -> letterbox -> infer -> detections over ZeroMQ.

    python run.py --config configs/demo.yaml          run the pipeline
    python run.py subscribe --camera demo             print the detections a camera publishes
    python run.py view --camera demo                  watch a camera: preview frames with detections drawn

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
    if config.runtime.workers and not args.check:
        from pipeline.workers import run_workers

        return run_workers(config, args.config, args.summary_json, args.log_level, stop_requested, signals)
    from pipeline.graph import Pipeline  # builds model, engine and socket: everything but the run

    deadline = config.runtime.shutdown_deadline_s
    pipeline = load_interruptibly(lambda: Pipeline(config, publish_connect=args.publish_connect), stop_requested, deadline)
    if args.check:
        pipeline.close()
        print(f"{args.config}: ok")
        return 0
    log.info("running %d camera(s) with %s, batch <= %d, publishing on %s", len(config.cameras),
             pipeline.engine.name, pipeline.engine.max_batch, pipeline.endpoint)
    subscribers = None
    if worker is not None and config.publish.wait_subscribers:
        # the supervisor counts the subscribers at its endpoint and says go; its proxy passes each
        # topic on once, so this worker then waits only until a subscription has reached it
        subscribers = min(1, channel.subscribers) if channel.wait_go() else 0
    pipeline.start(stop_requested, subscribers)
    drained = pipeline.wait(stop_requested=stop_requested)
    blocked = pipeline.join_sources(timeout=0.5)
    if blocked:  # a reader in a network read returns within its read timeout; do not wait for it
        log.warning("camera(s) %s: reader still in a network read at exit; abandoned", ", ".join(blocked))
    summary = pipeline.snapshot()
    log.info("done: %s", pipeline.status_line())
    pipeline.close()  # the publisher's last messages leave here (within the shutdown deadline)
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


def cmd_subscribe(args) -> int:
    import zmq

    from stages.publish import topic_for

    _setup_logging(args.log_level or "info")
    socket = zmq.Context.instance().socket(zmq.SUB)
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
    run.set_defaults(func=cmd_run)

    sub = commands.add_parser("subscribe", help="print the messages one or more cameras publish")
    sub.add_argument("--connect", default="tcp://127.0.0.1:5555", help="publisher endpoint (default: %(default)s)")
    sub.add_argument("--camera", action="append", help="camera id; repeat for several; default: all cameras")
    sub.add_argument("--prefix", default="det", help="topic prefix (publish.topic_prefix; default: %(default)s)")
    sub.add_argument("--count", type=_number(int, 1, 1e9), help="exit after this many messages")
    sub.add_argument("--timeout", type=_number(float, 0, DAY_S, low_open=True),
                     help="exit 1 when no message arrives for this many seconds")
    sub.add_argument("--summary", action="store_true", help="one short line per message instead of the JSON header")
    sub.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    sub.set_defaults(func=cmd_subscribe)

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
    view.set_defaults(func=cmd_view)
    return parser


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
