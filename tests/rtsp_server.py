#!/usr/bin/python3
"""A real RTSP server on loopback for the live-source tests (GStreamer's gst-rtsp-server).

Run it with Debian's Python, which has the `gi` bindings (a virtualenv does not):

    /usr/bin/python3 tests/rtsp_server.py --port 8554 [--fps 25] [--key-int N] [--size 320x240] [--clip video.mp4]

Mounts (each a shared media factory: every client sees the same stream):
- `/live`: a live test pattern (videotestsrc, H.264 via x264enc with zero latency);
- `/clip`: the given file, streamed at its own rate (ends after the file; clients reconnect).

Prints `ready rtsp://127.0.0.1:PORT` on stdout once it accepts connections. Kill it to simulate a
camera that goes away; SIGSTOP it to simulate one that freezes.
"""

import argparse
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def live_pipeline(fps: int, width: int, height: int, key_int: int | None = None) -> str:
    return (
        f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},framerate={fps}/1 "
        f"! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={key_int or fps} bframes=0 "
        f"! rtph264pay name=pay0 pt=96 config-interval=1 )"
    )


def clip_pipeline(path: str) -> str:
    return f'( filesrc location="{path}" ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1 )'


def keep_prepared(_factory, media) -> None:
    """Keep a shared media prepared when its last client leaves: unpreparing it races with a client
    that connects at that moment (seen: the server refuses it, EPERM in FFmpeg, or aborts in
    gst_rtsp_media_get_rates), which real cameras never do."""
    media.set_reusable(True)
    media.set_stop_on_disconnect(False)
    media.set_suspend_mode(GstRtspServer.RTSPSuspendMode.NONE)
    media.prepare(None)  # one prepare more than its clients': the media stays prepared with none


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--address", default="127.0.0.1", help="where to listen (the fleet test: a namespace's address)")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--key-int", type=int, default=None,
                        help="frames from one keyframe to the next on /live (default: the fps, one a second; 1: every frame)")
    parser.add_argument("--size", default="320x240", help="WIDTHxHEIGHT of the live pattern")
    parser.add_argument("--clip", help="a H.264 MP4 file to serve on /clip")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address(args.address)
    server.set_service(str(args.port))
    mounts = server.get_mount_points()
    mounts_wanted = {"/live": live_pipeline(args.fps, width, height, args.key_int)}
    if args.clip:
        mounts_wanted["/clip"] = clip_pipeline(args.clip)
    for path, launch in mounts_wanted.items():
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(launch)
        factory.set_shared(True)
        if path == "/live":  # the clip mount ends after the file, and a reconnecting client starts it over
            factory.connect("media-configure", keep_prepared)
        mounts.add_factory(path, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on {args.address}:{args.port}", file=sys.stderr)
        return 1
    print(f"ready rtsp://{args.address}:{args.port}", flush=True)
    loop = GLib.MainLoop()
    try:
        loop.run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
