#!/usr/bin/env bash
# Run the test suite: creates .venv if it is missing, installs fedtune into it, runs pytest.
# Extra arguments go to pytest (e.g. ./run_tests.sh -k partition -x).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$root/scripts/ensure_venv.sh"
cd "$root"
export HF_HUB_OFFLINE=1
exec "$root/.venv/bin/python" -m pytest "$@"
