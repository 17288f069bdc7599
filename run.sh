#!/usr/bin/env bash
# One entry point for a fresh machine (Python 3.10+):
#   bash run.sh        set everything up, train the CNN, run the notebook and build the slides
#   bash run.sh test   set everything up and run the tests
#   bash run.sh mutate mutation testing of the engine and checkpoint loader -> results/mutation.json
# CIFAR-10 comes from torchvision's download; offline, set CIFAR10_DIR to an image folder
# (train/<class>/*, test/<class>/*) or keep the copy in ../shared/data/cifar10.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if [ ! -f .venv/.installed ] || [ requirements.txt -nt .venv/.installed ]; then
  # No wheel cache, and torch (about 5.5 GB with its CUDA libraries) in a call of its own: a CI
  # machine once ran out of disk in the middle of this install.
  export PIP_NO_CACHE_DIR=1
  python -m pip install -q --upgrade pip
  python -m pip install -q $(grep -E '^torch(vision)?==' requirements.txt)
  python -m pip install -q -r requirements.txt
  python -m pip install -q --no-deps --no-build-isolation -e .  # the package, importable from anywhere
  python -m ipykernel install --sys-prefix --name python3 >/dev/null
  touch .venv/.installed
fi
case "${1:-main}" in
  test)
    shift || true
    python -m ruff check .
    python -m pytest -q "$@"
    ;;
  mutate)
    # Mutation testing (not part of CI): mutmut re-runs the fast float64 tests once per mutant of
    # the engine and the checkpoint loader; cached in mutants/, so a stopped run resumes. One thread
    # per mutant, one mutant per core (MUTMUT_CHILDREN to change).
    # Optional: a mutant-name glob, e.g. bash run.sh mutate "influence_over_inference.engine.scores*"
    shift || true
    python -m pip install -q -r requirements-dev.txt
    export OMP_NUM_THREADS=1
    # each mutant starts pytest afresh: cache compiled files and skip plugin discovery (2x faster here)
    export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
    unset PYTHONDONTWRITEBYTECODE
    start=$(date +%s)
    python -m mutmut run --max-children "${MUTMUT_CHILDREN:-$(nproc)}" "$@" || true
    python tools/mutation.py --minutes "$(python -c "print(round(($(date +%s) - $start) / 60, 1))")"
    ;;
  main)
    python -m influence_over_inference train --json results/train.json
    python -m influence_over_inference notebook
    python -m influence_over_inference slides
    ;;
  *)
    echo "usage: bash run.sh [main|test|mutate]" >&2
    exit 2
    ;;
esac
