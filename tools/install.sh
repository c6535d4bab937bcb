#!/usr/bin/env bash
# Idempotent install of the whole stack into .venv/ (called by `make setup`).
#   GPU=0 (default): tensorflow-cpu, Horovod with Gloo + MPI.
#   GPU=1: tensorflow[and-cuda], Horovod additionally built with NCCL for GPU allreduce
#          (needs the CUDA toolkit on the node; set HOROVOD_NCCL_HOME if NCCL is not in a default path).
#   TF=2.15 (default) | 2.21: the lane. TF=2.15: Python 3.11, TensorFlow 2.15, Horovod, in .venv.
#          TF=2.21: Python 3.13, TensorFlow 2.21 with tf_keras and no Horovod (the tf engine only),
#          in .venv-tf2.21, pinned by constraints.txt's #@tf2.21 lines.
#   PYTHON=...: the interpreter for a new venv (default: the lane's python3.X on PATH, else pyenv's).
# Every step checks whether it is already done, so a second run costs seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=${GPU:-0}
TF=${TF:-2.15}
case "$TF" in
  2.15) VENV=.venv LANE= PY_VERSION=3.11 ;;
  2.21) VENV=.venv-tf2.21 LANE=tf2.21 PY_VERSION=3.13 ;;
  *) echo "error: TF: unknown lane '$TF' (2.15 or 2.21)" >&2; exit 2 ;;
esac
PIP="$VENV/bin/pip --disable-pip-version-check -q"
export TF_CPP_MIN_LOG_LEVEL=2

# 1. Debian packages (Open MPI for Horovod's MPI controller and mpi4py; cmake + g++ for the build).
missing=()
for pkg in openmpi-bin libopenmpi-dev cmake g++ make; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 2. The virtual environment, made with the lane's Python: python3.X where it runs (a pyenv shim
#    is on PATH but fails when that version is not selected), else the newest pyenv-installed 3.X.
find_python() {
  local root candidate
  root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
  for candidate in "python$1" $(ls -d "$root/versions/$1".*/bin/"python$1" 2>/dev/null | sort -rV); do
    "$candidate" -c 'import venv, ensurepip' 2>/dev/null && { echo "$candidate"; return; }
  done
  return 1
}
if [ ! -x "$VENV/bin/python" ]; then
  PYTHON=${PYTHON:-$(find_python "$PY_VERSION")} || {
    echo "error: TF=$TF: needs Python $PY_VERSION: no python$PY_VERSION on PATH or in pyenv (or set PYTHON=)" >&2
    exit 2
  }
  echo "setup: creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi

# 3. Python packages, pinned by constraints.txt (a lane's own pins replacing those of the same
#    package). The stamp holds the constraints' hash so a changed pin reinstalls.
constraints=constraints.txt
extra=()
if [[ -n $LANE ]]; then
  constraints="$VENV/constraints-$LANE.txt"
  lane_pins="$(sed -n "s/^#@$LANE //p" constraints.txt)"
  replaced="$(sed 's/[=<>!~].*//' <<<"$lane_pins" | paste -sd'|')"
  { grep -vE "^($replaced)[=<>!~]" constraints.txt; echo "$lane_pins"; } > "$constraints"
  extra=(tensorboard)  # TF 2.21 no longer pulls TensorBoard in; the trainer writes its event files
fi
tf_pkg=$([ "$GPU" = 1 ] && echo 'tensorflow[and-cuda]' || echo tensorflow-cpu)
stamp="$VENV/.deps-$(cat "$constraints" setup.cfg | sha256sum | cut -c1-12)-gpu$GPU"
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python packages ($tf_pkg${LANE:+, lane $LANE})"
  $PIP install -c "$constraints" "$tf_pkg" "${extra[@]}" numpy protobuf mpi4py pandas scikit-learn scipy \
    pillow pydicom matplotlib tqdm tomli-w pytest pytest-timeout pytest-xdist ruff setuptools wheel openvino nncf \
    optuna sqlalchemy alembic psycopg2-binary
  # tf_keras requires `tensorflow` by name, which on CPUs tensorflow-cpu is under another name: the
  # full wheel beside it would overwrite the same files, and alone it logs a CUDA error at every
  # start on a machine without a GPU. So tf_keras goes in without that dependency.
  if [[ -n $LANE ]]; then $PIP install -c "$constraints" --no-deps tf_keras; fi
  touch "$stamp"
fi

# 4. Horovod, built from source against the TensorFlow above (--no-build-isolation so it sees it);
#    not in the TF 2.21 lane, which it does not build against.
if [[ -z $LANE ]] && ! "$VENV/bin/python" -c 'import horovod.tensorflow' 2>/dev/null; then
  echo "setup: building Horovod (about 3-5 minutes on 2 cores)"
  export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
         HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
  [ "$GPU" = 1 ] && export HOROVOD_GPU_OPERATIONS=NCCL
  $PIP install -c constraints.txt --no-build-isolation --no-cache-dir horovod
  # Horovod 0.28.1 also ticks PyTorch although it was not built: check TensorFlow only.
  build=$("$VENV/bin/horovodrun" --check-build)
  echo "$build"
  for want in TensorFlow MPI Gloo; do
    grep -qE "\[X\] $want" <<<"$build" \
      || { echo "error: horovod: built without $want support" >&2; exit 1; }
  done
fi

# 5. The package itself, editable.
# (checked from / : in the repo root the package would import without being installed)
(cd / && "$OLDPWD/$VENV/bin/python" -c 'import chexnet_hvd' 2>/dev/null) \
  || $PIP install --no-deps --no-build-isolation -e .

echo "setup: ok ($VENV, GPU=$GPU, TF=$TF)"
