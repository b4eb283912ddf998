#!/usr/bin/env bash
# The whole test suite (unit, property, real encoder, real LangChain/LlamaIndex chains, examples, doctests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint_imports.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider \
  --doctest-modules semtoken_rag integrations tests "$@"
