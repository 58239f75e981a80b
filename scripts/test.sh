#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: algorithm, config, registration, then the
# engine and serving tests on the tiny models (marked `engine`; a few minutes on 2 CPU cores).
#   bash scripts/test.sh [pytest args]        e.g.  bash scripts/test.sh -m "not engine"
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
bash "$ROOT/scripts/install.sh" "$ROOT/.venv"
cd "$ROOT"
export HF_HUB_OFFLINE=1
exec "$ROOT/.venv/bin/python" -m pytest tests "$@"
