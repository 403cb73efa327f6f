# Sourced by the launch scripts: creates .venv on first use and installs unified_mm into it.
# Usage: source launch/env.sh [extras]   (extras default: test,convert)
set -euo pipefail
UNIFIED_MM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UNIFIED_MM_VENV:-$UNIFIED_MM_ROOT/.venv}"
EXTRAS="${1:-test,convert}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[unified_mm] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.unified_mm_installed_$(echo "$EXTRAS" | tr ',' '_')"
if [ ! -f "$STAMP" ] || [ "$UNIFIED_MM_ROOT/setup.cfg" -nt "$STAMP" ]; then
  echo "[unified_mm] installing unified_mm[$EXTRAS] into $VENV (a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$UNIFIED_MM_ROOT[$EXTRAS]"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
# CPU runs never need a TPU/GPU plugin's warnings; TPU launches override this.
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
# Persistent compilation cache: repeated runs and tests skip recompiling unchanged programs.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$UNIFIED_MM_ROOT/.cache/jax}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
cd "$UNIFIED_MM_ROOT"
