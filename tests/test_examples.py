"""The examples users copy from run offline, end to end (on the bundled sample when ../shared is absent)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["langchain_retrieval_chain.py", "llamaindex_query_engine.py", "chatbot.py"])
def test_example_runs(script):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "token" in proc.stdout.lower()
