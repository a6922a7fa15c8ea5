#!/usr/bin/env bash
# Create .venv if it is missing and install fedtune into it (editable, with the dev and ray
# extras: the tests run the Ray backend on a local Ray instance).
# Re-installs only when pyproject.toml changed since the last install. Sourced by
# run_tests.sh and run_all.sh so both set up the same environment.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.fedtune-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
    echo "fedtune: creating $venv" >&2
    "${PYTHON:-python3}" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "fedtune: installing fedtune and its dependencies into $venv (first time: a few minutes)" >&2
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e "$root[dev,ray]"
    "$venv/bin/python" -m ipykernel install --prefix "$venv" --name python3 >/dev/null
    echo "$want" > "$stamp"
fi
