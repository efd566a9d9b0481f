# Shared by scripts/demo and scripts/test: make .venv and install vramkit into it.
# Usage: . scripts/_setup.sh EXTRAS   (EXTRAS such as "all" or "dev")
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
# torch first, pinned, so nothing below pulls a multi-GB CUDA build by accident.
# On a GPU machine set TORCH_SPEC to the build you want (e.g. "torch==2.13.0"
# from the CUDA index) before running.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
    echo "==> installing $TORCH_SPEC"
    python -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC"
fi
echo "==> installing vramkit[$1]"
python -m pip install --quiet --disable-pip-version-check -e ".[$1]"
