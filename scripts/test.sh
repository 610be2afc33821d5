#!/usr/bin/env bash
# Set up and run the test suite (CPU; GPU tests skip where there is no GPU).
#   bash scripts/test.sh [pytest args]
# Tests read assets from ASSETS_DIR (default: ../shared/assets beside the project).
source "$(dirname "$0")/_env.sh"
# libgl1/glib: OpenCV; gstreamer + gi: the RTSP test server (bad: h264parse for the clip mount);
# xvfb, ffmpeg (x11grab), xdotool: the viewer's window test
# redis-server, mosquitto: the broker sinks' and fleet tests' real servers; iproute2: the fleet test's namespaces
apt_install libgl1 libglib2.0-0 xvfb ffmpeg xdotool python3-gi gir1.2-gst-rtsp-server-1.0 \
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly \
  redis-server mosquitto iproute2
venv_install requirements-dev.txt
# the Triton engine's tests run a real tritonserver (PyTriton) from its own venv; a failure here skips
# those tests with the reason (tests/test_triton.py), it does not stop the suite
apt_install python3-venv
bash scripts/triton_venv.sh || echo "warning: scripts/triton_venv.sh failed: the Triton tests will skip"
export ASSETS_DIR=${ASSETS_DIR:-$(cd "$ROOT/../shared/assets" 2>/dev/null && pwd || echo "$ROOT/assets")}
if [ ! -f "$ASSETS_DIR/models/yolox_nano.onnx" ]; then
  .venv/bin/python scripts/fetch_assets.py && ASSETS_DIR="$ROOT/assets"
fi
echo "assets: $ASSETS_DIR"
exec .venv/bin/python -m pytest "$@"
