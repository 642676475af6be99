#!/usr/bin/env bash
# llama.cpp for real, run once (too slow for CI: building llama-cpp-python took 751 s here on 2 shared cores).
# Builds llama-cpp-python from source (it vendors llama.cpp) in its own venv that sees this python's packages
# (clex, torch, transformers), portable (-DGGML_NATIVE=OFF), two compile jobs; then the check script and the test:
#   bash experiments/serving/llama_cpp_run.sh [VENV]      (default /work/venvs/llamacpp)   -> experiments/serving/results/llama_cpp.json
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${1:-/work/venvs/llamacpp}"
version="0.3.36"
start=$SECONDS
python -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 "$venv/bin/python" -m pip install --no-cache-dir "llama-cpp-python==$version"
echo "llama_cpp_run.sh: venv + build ${version} took $((SECONDS - start)) s"
"$venv/bin/python" experiments/serving/llama_cpp_check.py --out experiments/serving/results/llama_cpp.json
"$venv/bin/python" -m pytest tests/hf/test_engines.py -k llama_cpp -q
