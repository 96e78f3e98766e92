#!/usr/bin/env bash
# The GPU check: FLIP's paper profile (params.yaml + profiles/paper.txt) on the MovieLens-1M copy in one
# call that fits in 10 minutes on one H100/H200, start-up included. Details: benchmarks/gpu_check.py.
#
#   benchmarks/gpu_check.sh --build-bundle .gpu-bundle    # HERE, with the project's .venv: processed ML-1M
#                                                         #   (flip preprocess) + all-MiniLM-L6-v2 in fp16,
#                                                         #   fails above 64 MiB
#   benchmarks/gpu_check.sh [--bundle .gpu-bundle]        # THERE (no network, no DVC/Prefect/DuckDB):
#                                                         #   the python3 first on PATH, torch+transformers+pyarrow
#   benchmarks/gpu_check.sh --dry-run                     # both phases on CPU at tiny sizes (CI)
#
# Device call (the bundle is git-ignored, so it must be carried):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-bundle"], timeout_s=540)
# Writes benchmarks/results/gpu_check.json (rewritten after every stage) and, where $OUT is set, copies it
# and the log (gpu_check.log) there. Other arguments go to gpu_check.py: run phase --budget-s S (default
# 420), --strategies ..., -S key=value, ...; build phase --data DIR, --fresh (`python3 benchmarks/gpu_check.py
# run --help`). TinyBERT (the paper's model) is not available offline: the check runs MiniLM and says so.
# Environment: FLIP_DATA_MIRROR (dataset mirror, else ../shared/data), FLIP_BUILD_PYTHON (default
# .venv/bin/python), GPU_CHECK_TIMEOUT_S (hard stop of the run phase; default 500, dry run 600).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

dry=0
build=""
bundle=""
pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --build-bundle) build="${2:?--build-bundle needs a directory}"; shift ;;
    --build-bundle=*) build="${1#*=}" ;;
    --bundle) bundle="${2:?--bundle needs a directory}"; shift ;;
    --bundle=*) bundle="${1#*=}" ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) pass+=("$1") ;;
  esac
  shift
done
dryflag=()
[ "$dry" = 1 ] && dryflag=(--dry-run)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1

build_bundle() {  # DIR [args...]: the build phase, with the project's environment (it needs DuckDB)
  local py="${FLIP_BUILD_PYTHON:-$ROOT/.venv/bin/python}"
  if [ ! -x "$py" ]; then
    echo "gpu_check: the build phase needs the project's environment ($py is missing): run \`make setup\`" >&2
    exit 2
  fi
  "$py" benchmarks/gpu_check.py build --bundle "$1" "${dryflag[@]}" "${@:2}"
}

if [ -n "$build" ]; then
  build_bundle "$build" "${pass[@]}"
  exit $?
fi

# ---- run phase
if [ -z "$bundle" ]; then
  if [ "$dry" = 1 ]; then
    bundle="runs/gpu_check_dry_bundle"
    [ -f "$bundle/manifest.json" ] || build_bundle "$bundle"
  else
    bundle=".gpu-bundle"
  fi
fi
if [ ! -f "$bundle/manifest.json" ]; then
  echo "gpu_check: no bundle at $bundle: build it here with \`benchmarks/gpu_check.sh --build-bundle $bundle\`" \
       "and carry it to the GPU machine (run(..., carry=[\"$bundle\"]))" >&2
  exit 2
fi
py="$(command -v python3 || command -v python || true)"
if [ -z "$py" ]; then
  echo "gpu_check: no python3 or python on PATH" >&2
  exit 2
fi
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
  logfile="$OUT/gpu_check.log"
else
  mkdir -p runs
  logfile="runs/gpu_check$([ "$dry" = 1 ] && echo _dry || true).log"
fi
limit="${GPU_CHECK_TIMEOUT_S:-$([ "$dry" = 1 ] && echo 600 || echo 500)}"
echo "gpu_check: run phase with $py, bundle $bundle, hard stop after ${limit}s, log $logfile"
set +e
timeout --signal=TERM --kill-after=15 "$limit" \
  "$py" benchmarks/gpu_check.py run --bundle "$bundle" "${dryflag[@]}" "${pass[@]}" 2>&1 | tee "$logfile"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "gpu_check: stopped after ${limit}s; the results JSON holds every stage finished before that" >&2
fi
exit "$rc"
