#!/usr/bin/env bash
# Installs NVRTC and the CUDA headers from PyPI into .venv-nvrtc/ in the repository root, where
# fastpt looks for them (src/backend/gpu/toolkit_paths.rs). No GPU and no CUDA toolkit needed:
# build.rs compiles kernels/*.cu with it into CUBIN and PTX images the binary carries
# (tests/kernel_images.rs checks them), and the binary uses it at run time for GPUs no image fits.
# Idempotent: does nothing when the pinned versions are already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-nvrtc
PACKAGES=(nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96)

installed() {
  [ -x "$VENV/bin/python" ] || return 1
  local p
  for p in "${PACKAGES[@]}"; do
    [ "$("$VENV/bin/python" -m pip show "${p%%==*}" 2>/dev/null | sed -n 's/^Version: //p')" = "${p##*==}" ] \
      || return 1
  done
}

if installed; then
  echo "nvrtc-venv: ${PACKAGES[*]} already in $VENV"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "nvrtc-venv: creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV" || {
    echo "nvrtc-venv: '${PYTHON:-python3} -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
    exit 1
  }
fi
echo "nvrtc-venv: installing ${PACKAGES[*]}"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}"
installed || { echo "nvrtc-venv: install did not leave ${PACKAGES[*]} in $VENV" >&2; exit 1; }
# build.rs looks for NVRTC only when it runs: make the next build run it, to embed the kernels.
touch build.rs
echo "nvrtc-venv: done ($(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13/lib))"
