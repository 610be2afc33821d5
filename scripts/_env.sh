# Shared by scripts/demo.sh and scripts/test.sh: Debian packages, a virtualenv, Python packages.
# Idempotent: a second run installs nothing new.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  if [ ${#missing[@]} -gt 0 ]; then
    local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

venv_install() {  # venv_install REQUIREMENTS_FILE
  if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
  local stamp=".venv/.installed-$(sha256sum "$1" requirements.txt | sha256sum | cut -c1-16)"
  if [ ! -e "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -r "$1"
    touch "$stamp"
  fi
  # numba compiles the tracker's kernels on first use (several seconds) and caches them beside the
  # source: do it here, so that no run or test waits for it (seconds a run when already cached)
  .venv/bin/python -c "from pipeline.tracking import ByteTracker; ByteTracker()"
}
