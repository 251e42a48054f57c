#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with hydra-edge and its test tools.
#
#   bash scripts/setup.sh            # CPU build of torch unless an NVIDIA GPU is present
#   VENV=/path/to/venv bash scripts/setup.sh
#
# torch is installed first so pip never resolves plain `torch` to the multi-GB CUDA build on
# a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade pip

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
local_cpu_wheel() {  # a CPU torch wheel offered through pip's find-links (offline mirrors, CI)
  local dir
  for dir in ${PIP_FIND_LINKS:-}; do
    compgen -G "$dir/torch-*+cpu-*.whl" >/dev/null && { basename "$(ls "$dir"/torch-*+cpu-*.whl | sort | tail -1)"; return 0; }
  done
  return 1
}

if "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "torch already installed: $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
elif has_gpu; then
  echo "NVIDIA GPU found: installing the CUDA build of torch"
  "${PIP[@]}" install "torch>=2.6"
elif wheel=$(local_cpu_wheel); then
  version=${wheel#torch-}; version=${version%%+cpu*}
  echo "no GPU: installing the local CPU build torch $version"
  "${PIP[@]}" install "torch==$version"
else
  echo "no GPU: installing the CPU build of torch from PyTorch's CPU index"
  "${PIP[@]}" install torch --index-url https://download.pytorch.org/whl/cpu
fi

# llama-cpp-python (the `llama` extra) builds llama.cpp from source the first time (4-5 minutes
# on 2 cores; pip caches the wheel). GGML_NATIVE=OFF builds portable AVX2 kernels, so a cached
# wheel runs on any x86-64 CPU with AVX2, not only the one it was built on.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
"${PIP[@]}" install --quiet -e ".[dev]"
echo "ready: . $VENV/bin/activate && hydra-edge finetune"
