#!/usr/bin/env bash
# The environment of the mflux tests: its own virtual environment (default .venv-mflux/ at the repository root,
# ignored by git; no system site-packages, so the main environment's diffusers / huggingface-hub 2.x are untouched)
# with MLX's CPU build, mflux 0.24.0 (--no-deps, see requirements.txt) and fewstep itself (no torch).
#   bash tests/mflux/setup_env.sh [VENV_DIR] && VENV_DIR/bin/python -m pytest -q tests/mflux
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${1:-$repo/.venv-mflux}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q -r "$repo/tests/mflux/requirements.txt"
"$venv/bin/python" -m pip install -q --no-deps mflux==0.24.0
"$venv/bin/python" -m pip install -q --no-deps -e "$repo"
"$venv/bin/python" -c "import mlx.core, mflux, fewstep.mflux; print('mflux test environment ready:', '$venv')"
