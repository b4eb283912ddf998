#!/usr/bin/env bash
# The whole test suite, in two tiers (what CI runs). Extra arguments go to both pytest runs.
#   unit tier  (-m "not slow"): pure functions and the engine on a tiny random-weight BERT, doctests
#   slow tier  (-m slow): the real packaged encoder, real LangChain/LlamaIndex chains, the examples
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint_imports.sh

tier() {  # pytest's status 5 (arguments selected no test of this tier) is not a failure
  local status=0
  .venv/bin/python -m pytest -q -p no:cacheprovider "$@" || status=$?
  [ "$status" -eq 0 ] || [ "$status" -eq 5 ] || exit "$status"
}
tier -m "not slow" --doctest-modules semtoken_rag integrations tests "$@"
tier -m slow tests "$@"
