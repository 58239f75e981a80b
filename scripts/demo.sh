#!/usr/bin/env bash
# Set up (if needed), then serve the tiny Qwen2.5-VL pair with LVSpec and answer one video
# request through the OpenAI-compatible API.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
bash "$ROOT/scripts/install.sh" "$ROOT/.venv"
export HF_HUB_OFFLINE=1
exec "$ROOT/.venv/bin/lvspec-demo" "$@"
