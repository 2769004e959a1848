#!/usr/bin/env bash
# What a session lent a GPU runs, as one device call (the device tool's `run`, carrying .whl):
#
#   bash bench/gpu_session.sh                                  # everything, within gpu_check's --budget-s
#   bash bench/gpu_session.sh --parts correctness --budget-s 150   # the rerun after a fix
#
# Results under $OUT (the tool's), else ./gpu_check_out. The GPU machine's image has torch,
# transformers, triton, pyarrow... (bench/gpu_image.txt) but not DeepSpeed, pydantic or `datasets`:
# they travel as wheels in .whl/ (git-ignored), made on a CPU machine by `python bench/gpu_wheels.py`,
# which checks that they and the image meet each other's requirements. .whl/old holds datasets 3.6,
# installed instead where the image's pyarrow is older than the newest datasets needs.
# bench/rehearse_gpu_session.sh runs this script the same way on a CPU, in a clean virtualenv.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_check_out}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 PYTHONPATH=$SITE
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@"; }
install .whl/*.whl || exit 1
if ! python3 -c "import datasets" 2>/dev/null; then
  echo "datasets $(ls .whl/datasets-*) does not import here; trying .whl/old"
  rm -rf "$SITE"/datasets* "$SITE"/dill* "$SITE"/multiprocess*
  install .whl/old/*.whl || exit 1
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, deepspeed, datasets, pyarrow, transformers; print('torch', torch.__version__, 'deepspeed',
deepspeed.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__, 'transformers',
transformers.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$OUT/environment.txt"
python3 bench/gpu_check.py --out "$OUT" --work /tmp/gpu_check_work "$@" 2>&1 | tee "$OUT/gpu_check.log"
