#!/usr/bin/env bash
# Create .venv if it is missing and install fedtune into it (editable), with the extras in
# $FEDTUNE_EXTRAS: run_tests.sh asks for dev,ray,flower (the tests run the Ray backend on a
# local Ray instance and a Flower federation on localhost), run_all.sh for none (the study
# needs no test tools, no Ray wheel and no Flower).
# Re-installs only when pyproject.toml changed since the last install or an extra is missing.
# Sourced by run_tests.sh and run_all.sh so both set up the same environment.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.fedtune-installed"
extras="${FEDTUNE_EXTRAS-dev,ray,flower}"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
    echo "fedtune: creating $venv" >&2
    "${PYTHON:-python3}" -m venv "$venv"
fi
have_hash="" have_extras=""
[ -f "$stamp" ] && read -r have_hash have_extras < "$stamp" || true
missing=""
for extra in ${extras//,/ }; do
    case ",$have_extras," in *",$extra,"*) ;; *) missing=1 ;; esac
done
if [ "$have_hash" != "$want" ] || [ -n "$missing" ]; then
    # keep what was installed before (same pyproject): the union of both sets of extras
    [ "$have_hash" = "$want" ] && extras="$(printf '%s\n' ${have_extras//,/ } ${extras//,/ } | sort -u | paste -sd, -)"
    echo "fedtune: installing fedtune${extras:+ [$extras]} and its dependencies into $venv (first time: a few minutes)" >&2
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e "$root${extras:+[$extras]}"
    "$venv/bin/python" -m ipykernel install --prefix "$venv" --name python3 >/dev/null
    echo "$want $extras" > "$stamp"
fi
