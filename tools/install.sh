#!/usr/bin/env bash
# Idempotent install of the whole stack into .venv/ (called by `make setup`).
#   GPU=0 (default): tensorflow-cpu, Horovod with Gloo + MPI.
#   GPU=1: tensorflow[and-cuda], Horovod additionally built with NCCL for GPU allreduce
#          (needs the CUDA toolkit on the node; set HOROVOD_NCCL_HOME if NCCL is not in a default path).
#   TF=2.15 (default) | 2.20: the lane. TF=2.20 installs into .venv-tf2.20 TensorFlow 2.20 with
#          tf_keras and no Horovod (the tf engine only), pinned by constraints.txt's #@tf2.20 lines.
# Every step checks whether it is already done, so a second run costs seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=${GPU:-0}
TF=${TF:-2.15}
PYTHON=${PYTHON:-python3.11}
case "$TF" in
  2.15) VENV=.venv LANE= ;;
  2.20) VENV=.venv-tf2.20 LANE=tf2.20 ;;
  *) echo "error: TF: unknown lane '$TF' (2.15 or 2.20)" >&2; exit 2 ;;
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

# 2. The virtual environment.
[ -x "$VENV/bin/python" ] || { echo "setup: creating $VENV with $PYTHON"; "$PYTHON" -m venv "$VENV"; }

# 3. Python packages, pinned by constraints.txt (a lane's own pins replacing those of the same
#    package). The stamp holds the constraints' hash so a changed pin reinstalls.
constraints=constraints.txt
extra=()
if [[ -n $LANE ]]; then
  constraints="$VENV/constraints-$LANE.txt"
  lane_pins="$(sed -n "s/^#@$LANE //p" constraints.txt)"
  replaced="$(sed 's/[=<>!~].*//' <<<"$lane_pins" | paste -sd'|')"
  { grep -vE "^($replaced)[=<>!~]" constraints.txt; echo "$lane_pins"; } > "$constraints"
  extra=(tf_keras)
fi
tf_pkg=$([ "$GPU" = 1 ] && echo 'tensorflow[and-cuda]' || echo tensorflow-cpu)
stamp="$VENV/.deps-$(cat "$constraints" setup.cfg | sha256sum | cut -c1-12)-gpu$GPU"
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python packages ($tf_pkg${LANE:+, lane $LANE})"
  $PIP install -c "$constraints" "$tf_pkg" "${extra[@]}" numpy protobuf mpi4py pandas scikit-learn scipy \
    pillow pydicom matplotlib tqdm tomli-w pytest pytest-timeout pytest-xdist ruff setuptools wheel openvino nncf \
    optuna sqlalchemy alembic psycopg2-binary
  touch "$stamp"
fi

# 4. Horovod, built from source against the TensorFlow above (--no-build-isolation so it sees it);
#    not in the TF 2.20 lane, which it does not build against.
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
