#!/usr/bin/env bash
# The virtualenv the test/benchmark Triton server runs from (scripts/pytriton_server.py): .venv-triton.
# PyTriton's server needs numpy<2 and Debian's Python: with another Python the server starts but its
# Python backend stub cannot load any model. Idempotent: a second run installs nothing.
#   bash scripts/triton_venv.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=.venv-triton
stamp="$VENV/.installed-$(sha256sum requirements-triton-server.txt | cut -c1-16)"
[ -e "$stamp" ] && exit 0
if [ ! -x "$VENV/bin/python" ]; then /usr/bin/python3 -m venv "$VENV"; fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements-triton-server.txt
touch "$stamp"
