#!/usr/bin/env bash
# Run the whole study for one profile: every run of its grid (cached by config hash),
# every notebook executed by papermill, HTML reports, figures, and an index.html.
#
#   ./run_all.sh                      # the offline demo profile
#   ./run_all.sh --profile paper      # the full study (GPU, real weights and data)
#
# Resumable: finished runs are cached in results/<profile>/runs/; a second call computes
# nothing new. --force recomputes every run. A failed run is recorded as failed, the rest
# goes on, and the script ends non-zero naming what failed.
set -uo pipefail

usage() {
    cat <<'USAGE'
usage: ./run_all.sh [--profile NAME|FILE.toml] [--force] [--retry-failed] [--jobs N]
                    [--device DEV] [--backend pool|ray] [--address ADDR]
                    [--results-root DIR] [--data-dir DIR] [--rehearse]
  --profile       demo (default, offline), demo-fashion, paper (GPU, weights and CIFAR), smoke,
                  or a .toml file
  --force         recompute every run even if a finished record exists
  --retry-failed  run diverged runs again too (runs that failed otherwise always are)
  --jobs          pool: runs in parallel processes (default: one per GPU, or one per core
                  on CPU, max 4); ray: CPUs of the local Ray instance it starts
  --backend       where runs execute: pool (default, local processes) or ray
  --address       ray: a running Ray cluster to use (auto, HOST:PORT); default: a local one
  --device        auto (default), cpu, cuda, cuda:1 ...
  --results-root  folder holding results/<profile>/ (default: ./results)
  --data-dir      dataset folder (default: $FEDTUNE_DATA_DIR or ./data)
  --rehearse      every run shape of the profile once, tiny, at full size, then every
                  notebook on those records, into results/<profile>-rehearsal/ only
                  (run it before spending GPU-hours; see README.md)
Weights offline: --weights is per run; for the grid set FEDTUNE_WEIGHTS_DIR to a folder of
<model>.pt files (e.g. clip-vit-b32.pt, vit-b16.pt), see README.md.
USAGE
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
profile=demo rerun=() jobs=0 device=auto results_root="$root/results" data_dir=""
backend=pool address=() rehearse=()
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile="${2:?--profile needs a value}"; shift 2 ;;
        --force) rerun+=(--force); shift ;;
        --retry-failed) rerun+=(--retry-failed); shift ;;
        --jobs) jobs="${2:?--jobs needs a value}"; shift 2 ;;
        --device) device="${2:?--device needs a value}"; shift 2 ;;
        --backend) backend="${2:?--backend needs a value}"; shift 2 ;;
        --address) address=(--address "${2:?--address needs a value}"); shift 2 ;;
        --results-root) results_root="${2:?--results-root needs a value}"; shift 2 ;;
        --data-dir) data_dir="${2:?--data-dir needs a value}"; shift 2 ;;
        --rehearse) rehearse=(--rehearse); shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run_all.sh: unknown option '$1'; valid options: --profile, --force, --retry-failed, --jobs, --device, --backend, --address, --results-root, --data-dir, --rehearse, --help" >&2; exit 2 ;;
    esac
done
case "$jobs" in ''|*[!0-9]*) echo "run_all.sh: --jobs must be a whole number, got '$jobs'" >&2; exit 2 ;; esac
case "$backend" in pool|ray) ;; *) echo "run_all.sh: unknown --backend '$backend'; valid choices: pool, ray" >&2; exit 2 ;; esac

FEDTUNE_EXTRAS="" source "$root/scripts/ensure_venv.sh" || exit 1
bin="$root/.venv/bin"
export PYTHONUNBUFFERED=1

# Validate the profile first (one clear line and exit 2 on a bad name) and get its folder.
name="$("$bin/python" -c 'import sys
from fedtune_core.errors import ConfigError
from fedtune_core.study.grid import load_profile
try:
    print(load_profile(sys.argv[1]).name)
except ConfigError as err:
    sys.exit(f"run_all.sh: {err}")' "$profile")" || exit 2
nb_profile="$profile"
if [ ${#rehearse[@]} -gt 0 ]; then  # the rehearsal profile the grid writes, read by the notebooks
    name="$name-rehearsal"
    nb_profile="$results_root/$name/$name.toml"
fi
out="$results_root/$name"
mkdir -p "$out/logs" "$out/notebooks" "$out/reports" "$out/figures"
log="$out/logs/run_all.log"
exec > >(tee -a "$log") 2>&1
echo "== fedtune run_all: profile $name, results in $out ($(date -u +%FT%TZ))"

failures=()
# One dataset folder for the grid and the notebooks (which run from notebooks/).
export FEDTUNE_DATA_DIR="${data_dir:-${FEDTUNE_DATA_DIR:-$root/data}}"
nb_data="$FEDTUNE_DATA_DIR"
[ ${#rehearse[@]} -gt 0 ] && nb_data="$out/data"  # the rehearsal's stand-ins

echo "== 1/3 runs"
"$bin/fedtune" grid --profile "$profile" --results "$out" --jobs "$jobs" --device "$device" \
    --backend "$backend" "${address[@]}" "${rerun[@]}" "${rehearse[@]}" || failures+=("runs (see 'failed:' lines above)")

echo "== 2/3 notebooks"
# Each notebook is its own kernel process and only reads records, so they run side by side
# (notebook_jobs at a time, default 2; one at a time with --jobs 1 or bash older than 5.1);
# each one's output goes to its own log, shown in order once it has finished.
notebook() {  # papermill, then the HTML report; a failure named in $out/logs/<stem>.failed
    local stem="$1"
    if "$bin/papermill" "$root/notebooks/$stem.ipynb" "$out/notebooks/$stem.ipynb" \
            --cwd "$root/notebooks" -p profile "$nb_profile" -p results_root "$results_root" \
            -p device "$device" -p data_dir "$nb_data" --log-level WARNING; then
        "$bin/jupyter" nbconvert --to html --no-input --log-level WARN \
            --output-dir "$out/reports" "$out/notebooks/$stem.ipynb" \
            || echo "HTML export of $stem" > "$out/logs/$stem.failed"
    else
        echo "notebook $stem (executed copy with the error: $out/notebooks/$stem.ipynb)" \
            > "$out/logs/$stem.failed"
    fi
}
notebook_jobs=2
[ "$jobs" = 1 ] && notebook_jobs=1
(( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 501 )) && notebook_jobs=1  # wait -n PID...
stems=()
for nb in "$root"/notebooks/[0-9][0-9]_*.ipynb; do stems+=("$(basename "$nb" .ipynb)"); done
running=()
for stem in "${stems[@]}"; do
    rm -f "$out/logs/$stem.failed"
    while [ ${#running[@]} -ge $notebook_jobs ]; do
        wait -n "${running[@]}"
        alive=()
        for pid in "${running[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
        running=("${alive[@]}")
    done
    echo "-- $stem started ($(date -u +%T))"
    notebook "$stem" > "$out/logs/$stem.log" 2>&1 &
    running+=($!)
done
[ ${#running[@]} -gt 0 ] && wait "${running[@]}"
for stem in "${stems[@]}"; do
    echo "-- $stem"
    cat "$out/logs/$stem.log"
    [ -f "$out/logs/$stem.failed" ] && failures+=("$(cat "$out/logs/$stem.failed")")
done

echo "== 3/3 index"
"$bin/fedtune" index --profile "$nb_profile" --results "$out" || failures+=("index.html")

if [ ${#failures[@]} -gt 0 ]; then
    echo "== done with failures:"
    printf '   - %s\n' "${failures[@]}"
    echo "   log: $log"
    exit 1
fi
echo "== done: open $out/index.html (log: $log)"
