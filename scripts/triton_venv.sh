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
if [ ! -e "$stamp" ]; then
  if [ ! -x "$VENV/bin/python" ]; then /usr/bin/python3 -m venv "$VENV"; fi
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements-triton-server.txt
  touch "$stamp"
fi
# A model's second and later instances wait for the first one's handshake socket for 1 s (a default
# in PyTriton 0.7.0, not configurable); on a loaded 2-core machine the first takes longer, and the
# model fails to load ("Timeout occurred while waiting for config file"). Allow 60 s.
communication=$("$VENV/bin/python" -c 'import pytriton.proxy.communication as c; print(c.__file__)')
sed -i 's/def get_config_from_handshake_server(socket_path: pathlib.Path, timeout_s: float = 1.0)/def get_config_from_handshake_server(socket_path: pathlib.Path, timeout_s: float = 60.0)/' "$communication"
grep -q 'timeout_s: float = 60.0) -> dict' "$communication" || echo "warning: PyTriton's handshake timeout not patched ($communication)" >&2
