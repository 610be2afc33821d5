#!/usr/bin/env bash
# The test suite on a busy machine: the same tests as scripts/test.sh while CPU hogs run alongside
# (stress-ng, Debian), so a test that only passes on a fast, idle machine shows up here first.
#   bash scripts/stress_test.sh [pytest args]        STRESS_CPUS=N hogs (default 2)
source "$(dirname "$0")/_env.sh"
apt_install stress-ng
hogs=${STRESS_CPUS:-2}
stress-ng --cpu "$hogs" --cpu-method matrixprod --quiet &
stress_pid=$!
trap 'kill "$stress_pid" 2>/dev/null; wait "$stress_pid" 2>/dev/null' EXIT
echo "stress: $hogs CPU hogs (stress-ng pid $stress_pid) beside the suite on $(nproc) cores"
status=0
bash "$ROOT/scripts/test.sh" "$@" || status=$?
echo "stress: suite exited $status with $hogs CPU hogs alongside"
exit "$status"
