#!/usr/bin/env bash
# Set-up on a fresh machine: a virtual environment in .venv with semtoken-rag (editable), both framework
# extras and the test tools. Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install -q "${SEMTOKEN_TORCH:-torch>=2.2}"          # CUDA build
  else
    # CPU build: on these machines torch==2.13.0 installs a local CPU wheel; elsewhere point pip at a
    # CPU wheel index (PIP_INDEX_URL / PIP_EXTRA_INDEX_URL) or set SEMTOKEN_TORCH
    pip install -q "${SEMTOKEN_TORCH:-torch==2.13.0}"
  fi
fi
pip install -q -e ".[langchain,llamaindex,dev]"
# Redis server for the shared-store tests: Debian's redis-server package (maintained, security updates);
# installed once, a later run only finds it. Without root or apt-get the Redis tests skip, saying why.
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -q -o DPkg::Lock::Timeout=300 update >/dev/null
    apt-get -q -y -o DPkg::Lock::Timeout=300 install --no-install-recommends redis-server >/dev/null
  else
    echo "setup: redis-server not found and cannot be installed here (needs root and apt-get:" \
         "apt-get install redis-server); the Redis tests will be skipped" >&2
  fi
fi
