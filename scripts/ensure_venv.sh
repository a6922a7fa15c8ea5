#!/usr/bin/env bash
# Create .venv if it is missing and install fedtune into it (editable), with the extras in
# $FEDTUNE_EXTRAS: run_tests.sh asks for dev,ray,flower (the tests run the Ray backend on a
# local Ray instance and a Flower federation on localhost), run_all.sh for none (the study
# needs no test tools, no Ray wheel and no Flower).
# Re-installs only when pyproject.toml or this script changed since the last install, or an
# extra is missing.
# Installs with uv where it can (seconds, not minutes: same requirements, same wheels), else pip.
# Sourced by run_tests.sh and run_all.sh so both set up the same environment.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.fedtune-installed"
extras="${FEDTUNE_EXTRAS-dev,ray,flower}"
case "${FEDTUNE_INSTALLER:-uv}" in
    uv|pip) ;;
    *) echo "fedtune: unknown FEDTUNE_INSTALLER '$FEDTUNE_INSTALLER'; valid choices: uv, pip" >&2
       exit 2 ;;
esac
# what is installed follows pyproject.toml and how this script installs it
want="$(cat "$root/pyproject.toml" "$root/scripts/ensure_venv.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
    echo "fedtune: creating $venv" >&2
    "${PYTHON:-python3}" -m venv "$venv"
fi
# uv (bootstrapped into the venv by pip) installs the same requirements as pip, from the
# same places: it does not read pip's configuration, so pip's find-links, index URLs and
# constraint files are passed to it (here they point at wheels on local disk; without them
# uv would download torch from PyPI). FEDTUNE_INSTALLER=pip skips uv.
_fedtune_uv_install() {
    local venv="$1" target="$2" key value item
    [ "${FEDTUNE_INSTALLER:-uv}" = pip ] && return 1
    if [ ! -x "$venv/bin/uv" ]; then
        "$venv/bin/python" -m pip install --quiet uv || return 1
    fi
    # no --compile-bytecode: compiling every module installed (about 21,000, a quarter of
    # them ever imported) took longer than the install; the venv writes the bytecode of what
    # is imported, on first import (see _fedtune_bytecode below)
    local args=(pip install --quiet --python "$venv/bin/python" --index-strategy unsafe-best-match)
    while IFS= read -r line; do  # e.g. global.find-links='/opt/wheels'
        key="${line%%=*}" value="${line#*=}"
        value="${value#\'}" value="${value%\'}"
        for item in $value; do
            case "${key#*.}" in
                find-links) args+=(--find-links "$item") ;;
                index-url) args+=(--index-url "$item") ;;
                extra-index-url) args+=(--extra-index-url "$item") ;;
                constraint) args+=(--constraint "$item") ;;
            esac
        done
    done < <("$venv/bin/python" -m pip config list 2>/dev/null)
    "$venv/bin/uv" "${args[@]}" -e "$target"
}
# The venv's interpreters write the bytecode (.pyc) of what they import, on first import,
# even where PYTHONDONTWRITEBYTECODE is set (as on this project's machines): otherwise every
# process (a pool worker, a notebook's kernel, a Ray worker, a Flower ClientApp) compiles
# torch, sklearn, flwr ... from source again (measured: 17 s of a first tiny run's 25 s, a
# Flower simulation 66 s instead of 29 s). A .pth file's import line runs at every start of
# this venv's Python (site.py), and only of it; writes are atomic, so parallel processes
# may race to write the same file safely.
_fedtune_bytecode() {
    local site
    site="$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
    printf '%s\n' "import sys; sys.dont_write_bytecode = False  # fedtune: scripts/ensure_venv.sh" \
        > "$site/_fedtune_bytecode.pth"
}
have_hash="" have_extras=""
[ -f "$stamp" ] && read -r have_hash have_extras < "$stamp" || true
missing=""
for extra in ${extras//,/ }; do
    case ",$have_extras," in *",$extra,"*) ;; *) missing=1 ;; esac
done
if [ "$have_hash" != "$want" ] || [ -n "$missing" ]; then
    # keep what was installed before (same pyproject): the union of both sets of extras
    [ "$have_hash" = "$want" ] && extras="$(printf '%s\n' ${have_extras//,/ } ${extras//,/ } | sort -u | paste -sd, -)"
    echo "fedtune: installing fedtune${extras:+ [$extras]} and its dependencies into $venv" >&2
    target="$root${extras:+[$extras]}"
    if ! _fedtune_uv_install "$venv" "$target"; then
        if [ "${FEDTUNE_INSTALLER:-uv}" = pip ]; then
            echo "fedtune: installing with pip (FEDTUNE_INSTALLER=pip; a few minutes)" >&2
        else
            echo "fedtune: uv was not usable here; installing with pip instead (a few minutes)" >&2
        fi
        "$venv/bin/python" -m pip install --quiet --upgrade pip
        "$venv/bin/python" -m pip install --quiet -e "$target"
    fi
    _fedtune_bytecode "$venv"
    "$venv/bin/python" -m ipykernel install --prefix "$venv" --name python3 >/dev/null
    echo "$want $extras" > "$stamp"
fi
