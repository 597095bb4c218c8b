#!/usr/bin/env bash
# One short check of P-MNER on a CUDA machine without network (under 8 minutes on one H100); see
# benchmarks/gpu_check.py for the steps and docs/benchmarks-gpu.md for how to run it.
#
#   bash benchmarks/gpu_check.sh --prepare-wheels [DIR]   # here, with the registry: wheels to carry (default
#                                                         # benchmarks/gpu_wheels, ignored by git)
#   bash benchmarks/gpu_check.sh [--wheels-dir DIR] [gpu_check.py options]   # on the GPU machine, DIR carried
#   bash benchmarks/gpu_check.sh --dry-run                # the same steps on the CPU at tiny size
#
# Python: $PYTHON, else the repository's .venv/bin/python when there is one, else python3.
# Exit status: gpu_check.py's (0 all steps passed, 1 a step failed, 2 unusable arguments or environment).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY="$ROOT/.venv/bin/python"
else
    PY=python3
fi
export PYTHONUNBUFFERED=1

WHEELS="$ROOT/benchmarks/gpu_wheels"
DRY_RUN=0
ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --prepare-wheels)
            if [[ $# -gt 1 && "$2" != --* ]]; then WHEELS="$2"; shift; fi
            exec "$PY" benchmarks/gpu_check.py --prepare-wheels "$WHEELS"
            ;;
        --wheels-dir)
            [[ $# -gt 1 ]] || { echo "gpu_check.sh: --wheels-dir needs a folder" >&2; exit 2; }
            WHEELS="$2"; shift ;;
        --dry-run)
            DRY_RUN=1; ARGS+=("$1") ;;
        *)
            ARGS+=("$1") ;;
    esac
    shift
done

if [[ "$DRY_RUN" == 0 ]]; then
    # the GPU machine: the project's pure-Python dependencies it lacks come from the carried wheels
    if [[ ! -f "$WHEELS/manifest.json" ]]; then
        echo "gpu_check.sh: $WHEELS/manifest.json is missing: run 'bash benchmarks/gpu_check.sh --prepare-wheels' where the registry is reachable and carry benchmarks/gpu_wheels" >&2
        exit 2
    fi
    SITE="${TMPDIR:-/tmp}/pmner-gpu-site"
    "$PY" benchmarks/gpu_check.py --install-wheels "$WHEELS" --site "$SITE"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" benchmarks/gpu_check.py "${ARGS[@]+"${ARGS[@]}"}"
