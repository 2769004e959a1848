#!/usr/bin/env bash
# What a session lent a GPU runs, as one device call (the device tool's `run`, carrying .whl):
#
#   bash bench/gpu_session.sh            # results under $OUT (the tool's), else ./gpu_check_out
#
# The GPU machine's image has torch, transformers, triton, sentencepiece, pyarrow..., but not
# DeepSpeed, nor `datasets`: they travel as wheels in .whl/ (git-ignored), made on a CPU machine with
#   pip wheel --no-deps deepspeed==0.19.8 -w .whl
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl hjson pydantic pydantic-core annotated-types typing-inspection datasets dill multiprocess
#   (and the same for datasets==3.6.0 dill==0.3.8 multiprocess==0.70.16 into .whl/old: used if the
#   image's pyarrow is older than the newest datasets needs)
set -uo pipefail
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 PYTHONPATH=/tmp/site
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
install .whl/*.whl || exit 1
if ! python3 -c "import datasets" 2>/dev/null; then
  echo "datasets $(ls .whl/datasets-*) does not import here; trying .whl/old"
  rm -rf /tmp/site/datasets* /tmp/site/dill* /tmp/site/multiprocess*
  install .whl/old/*.whl || exit 1
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, deepspeed, datasets, pyarrow, transformers; print('torch', torch.__version__, 'deepspeed',
deepspeed.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__, 'transformers',
transformers.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$OUT/environment.txt"
python3 bench/gpu_check.py --out "$OUT" --work /tmp/gpu_check_work "$@" 2>&1 | tee "$OUT/gpu_check.log"
