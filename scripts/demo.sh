#!/usr/bin/env bash
# Set up and run the demo: the sample clip through YOLOX-Nano on the CPU, detections on ZeroMQ.
#   bash scripts/demo.sh                   (ASSETS_MIRROR=DIR to copy assets from a local folder)
source "$(dirname "$0")/_env.sh"
apt_install libgl1 libglib2.0-0
venv_install requirements.txt
.venv/bin/python scripts/fetch_assets.py ${ASSETS_MIRROR:+--mirror "$ASSETS_MIRROR"}
exec .venv/bin/python run.py --config configs/demo.yaml
