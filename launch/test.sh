#!/usr/bin/env bash
# The test suite (README command 2): sets up .venv if missing, then runs pytest.
#   bash launch/test.sh            default suite (slow tests excluded), 2 workers
#   bash launch/test.sh --slow     only the slow tests
#   bash launch/test.sh --all      everything
#   bash launch/test.sh tests/test_x.py -k name   any pytest arguments
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" test,convert
ARGS=()
MARK=()
for a in "$@"; do
  case "$a" in
    --slow) MARK=(-m slow) ;;
    --all) MARK=(-m "slow or not slow") ;;
    *) ARGS+=("$a") ;;
  esac
done
WORKERS="${UNIFIED_MM_TEST_WORKERS:-2}"
# loadfile: one worker per test file, so module fixtures are built once.
exec python -m pytest -n "$WORKERS" --dist loadfile --durations=15 "${MARK[@]}" "${ARGS[@]}"
