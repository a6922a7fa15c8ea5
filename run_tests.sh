#!/usr/bin/env bash
# Run the test suite: creates .venv if it is missing, installs fedtune into it, runs pytest
# in two worker processes.
# Extra arguments go to pytest (e.g. ./run_tests.sh -k partition -x).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$root/scripts/ensure_venv.sh"
cd "$root"
export HF_HUB_OFFLINE=1
# Two worker processes (pytest-xdist), each taking whole test files (a module's fixtures,
# such as the backend tests' Ray instance, are made once), the files with slow tests first
# (conftest orders them); -n N overrides (-n 0: one process), and so does -p no:xdist.
# (--dist loadgroup would be finer, but xdist 3.8 cannot group tests under pytest 9.)
parallel=(-n 2 --dist loadfile --no-loadscope-reorder)
for arg in "$@"; do
    if [[ $arg == no:xdist ]]; then parallel=(); fi
done
exec "$root/.venv/bin/python" -m pytest "${parallel[@]}" "$@"
