#!/usr/bin/env bash
# On a machine with a CUDA GPU: run the quick notebook on CUDA and the engine / device tests there,
# and say what was checked (about 5 minutes on one GPU; limit 8). Without CUDA: says so, exits 0.
#   bash bench/gpu_check.sh            (from the repository root, with the project's Python on PATH
#                                       or PYTHON=/path/to/python)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA device: nothing checked on a GPU (the CPU suite is: bash run.sh test)"
  exit 0
fi
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
out=data/notebook/gpu_check.ipynb
mkdir -p data/notebook
start=$(date +%s)
echo "1/2 quick notebook on CUDA (DEVICE='cuda') -> $out"
if timeout 300 "$PY" -m influence_over_inference notebook --quick --no-progress -p DEVICE='"cuda"' --output "$out"; then
  "$PY" - "$out" <<'PY' || status=1
import sys
from influence_over_inference.report.notebook import check_outputs
import nbformat
problems = check_outputs(sys.argv[1], k=5, n_test_images=2)
text = "".join(o.get("text", "") for c in nbformat.read(sys.argv[1], as_version=4).cells
               if c.cell_type == "code" for o in c.get("outputs", []))
if "device: cuda" not in text:
    problems.append("the notebook did not report running on cuda")
print("   notebook:", "every cell ran, figures and tables present, ran on cuda" if not problems else problems)
sys.exit(1 if problems else 0)
PY
else
  echo "   notebook FAILED on CUDA"; status=1
fi
echo "2/2 engine, device and nimarb tests with CUDA visible (cuda-marked tests run)"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_device.py tests/test_solvers.py tests/test_gradients.py tests/test_nimarb.py > data/notebook/gpu_check_tests.log 2>&1
rc=$?
tail -4 data/notebook/gpu_check_tests.log
[ $rc -eq 0 ] || status=1
echo "checked in $(( $(date +%s) - start )) s: $([ $status -eq 0 ] && echo 'all passed' || echo 'FAILURES above')"
exit $status
