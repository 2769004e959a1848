#!/usr/bin/env bash
# Rehearses the GPU session's device call on this CPU machine, so that the one call a lent GPU
# allows does not fail in its setup:
#   1. a clean virtualenv holding only what the GPU image holds of what the launcher needs
#      (bench/gpu_image.txt's `rehearse` lines, at the image's versions where this Python has them;
#      torch as the image's, a CUDA build from PyPI that runs on the CPU);
#   2. a copy of the checkout as the device tool sends it (tracked, and untracked but not ignored);
#   3. the wheels bench/gpu_wheels.py makes for this Python, in that copy's .whl;
#   4. bench/gpu_session.sh --dry there, as the device runs it (wheels installed into a --target
#      folder on PYTHONPATH, python3 from PATH): gpu_check's CPU dry run.
#
#   bash bench/rehearse_gpu_session.sh      # about 5 minutes; 6 GB under $WORK (/tmp/gpu_rehearsal)
#   KEEP_VENV=1 bash bench/rehearse_gpu_session.sh    # again after a fix, in the same virtualenv
#
# The image's Python is 3.12: the first of python3.12, pyenv's 3.12, python3 that runs is used
# (PYTHON=... to choose).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 python3; do
    if "$candidate" --version >/dev/null 2>&1; then PYTHON=$candidate; break; fi
  done
fi
TORCH_SPEC=${TORCH_SPEC:-$(grep -o '^torch==[^ ]*' bench/gpu_image.txt)}
WORK=${WORK:-/tmp/gpu_rehearsal}
step() { echo "== $(date +%T) $*"; }
PY=$WORK/venv/bin/python
if [ -n "${KEEP_VENV:-}" ] && [ -x "$PY" ]; then  # a rerun after a fix: the same virtualenv, all else anew
  rm -rf "$WORK/repo" "$WORK/out" "$WORK/site"
  step "the virtualenv of the last rehearsal (KEEP_VENV): $("$PY" --version)"
else
  rm -rf "$WORK"
  step "clean virtualenv: $("$PYTHON" --version)"
  "$PYTHON" -m venv "$WORK/venv"
fi
mkdir -p "$WORK/repo" "$WORK/out"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "$TORCH_SPEC"
pins=$(grep '# rehearse' bench/gpu_image.txt | sed 's/ *#.*//' | grep -v '^torch\b')
# shellcheck disable=SC2086
if ! "${PIP[@]}" $pins 2>"$WORK/pins.err"; then
  echo "   not every image version installs for $("$PY" --version) ($(tail -1 "$WORK/pins.err")); the newest instead"
  # shellcheck disable=SC2086
  "${PIP[@]}" $(echo "$pins" | sed 's/==.*//')
fi

step "the checkout as the device tool sends it"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && cp --parents -- "$f" "$WORK/repo/"
done

step "wheels for $("$PY" --version)"
"$PY" bench/gpu_wheels.py --python-version "$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" \
  --out "$WORK/repo/.whl"

step "bench/gpu_session.sh --dry"
cd "$WORK/repo"
PATH=$WORK/venv/bin:$PATH OUT=$WORK/out SITE=$WORK/site bash bench/gpu_session.sh --dry
status=$?
step "done: gpu_session.sh exited $status; $WORK/out holds gpu_check.md, .json, .log and environment.txt"
exit $status
