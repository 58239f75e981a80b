#!/usr/bin/env bash
# Set up (if needed), then serve the trained benchmark pair with LVSpec and caption one held-out
# video through the OpenAI-compatible API (lvspec-demo --help for options).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
bash "$ROOT/scripts/install.sh" "$ROOT/.venv"
export HF_HUB_OFFLINE=1
exec "$ROOT/.venv/bin/lvspec-demo" "$@"
