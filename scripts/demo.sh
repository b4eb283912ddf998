#!/usr/bin/env bash
# The main job on its embedded defaults: compress real retrieved passages and show what was saved.
# Uses the shared NQ evaluation data next to the clone when it is there, else the bundled sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
NQ=../shared/data/nq-open-20_total_documents_gold_at_0.first441.jsonl.gz
if [ -f "$NQ" ]; then
    exec .venv/bin/semtoken-rag demo --data "$NQ" "$@"
fi
exec .venv/bin/semtoken-rag demo "$@"
