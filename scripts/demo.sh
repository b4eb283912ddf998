#!/usr/bin/env bash
# The main job on its embedded defaults: compress real retrieved passages and show what was saved.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/semtoken-rag demo "$@"
