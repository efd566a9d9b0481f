# Shared by scripts/demo and scripts/test: make .venv and install vramkit into it.
# Usage: . scripts/_setup.sh EXTRAS   (EXTRAS such as "all" or "dev")
#
# torch comes first, from TORCH_SPEC (default torch==2.13.0) and, when set,
# TORCH_INDEX_URL. Which build that is depends on the index: on PyPI, Linux
# wheels of torch are CUDA builds (several GB with their nvidia-* packages;
# they run on a CPU too). For a CPU-only build (~200 MB download) run with
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# and for a given CUDA version with .../whl/cu126 and so on. A .venv that
# already has a torch keeps it.
#
# A rerun installs nothing when neither pyproject.toml, the extras nor the
# Python changed: the last successful install leaves a stamp in .venv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PIP=(python -m pip --disable-pip-version-check --quiet)

# Run a long, quiet step with a line every 15 s, so a first run never looks hung.
_vramkit_long() {
    local what="$1"
    shift
    local started=$SECONDS
    echo "==> $what"
    "$@" &
    local pid=$!
    while ! _vramkit_wait "$pid" 15; do
        echo "    ... still working ($((SECONDS - started)) s)"
    done
    wait "$pid"
    echo "    done in $((SECONDS - started)) s"
}

# Returns 0 once process $1 has exited, 1 if it is still running after $2 seconds.
_vramkit_wait() {
    local waited=0
    while kill -0 "$1" 2>/dev/null; do
        if [ "$waited" -ge "$2" ]; then
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    return 0
}

if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
    torch_args=("$TORCH_SPEC")
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        torch_args+=(--index-url "$TORCH_INDEX_URL")
    fi
    _vramkit_long "installing $TORCH_SPEC${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL} (about 1 GB; minutes on a first run)" \
        "${PIP[@]}" install "${torch_args[@]}"
fi
stamp=".venv/.vramkit-installed-$1"
wanted="$(python - "$1" <<'PY'
import hashlib, sys
from pathlib import Path

digest = hashlib.sha256(Path("pyproject.toml").read_bytes())
digest.update(f"{sys.argv[1]} {sys.version}".encode())
print(digest.hexdigest())
PY
)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && python -c "import vramkit" 2>/dev/null; then
    echo "==> vramkit[$1] already installed in .venv (pyproject.toml unchanged)"
else
    rm -f "$stamp"
    _vramkit_long "installing vramkit[$1] into .venv (editable)" \
        "${PIP[@]}" install -e ".[$1]"
    echo "$wanted" > "$stamp"
fi
