"""Questions with retrieved passages for ``semtoken-rag demo`` (NQ 20-passage "Lost in the Middle" data).

The demo uses the shared NQ file next to a clone of the repository when it is there, else the small
sample bundled with the package. Answer matching follows SQuAD normalisation (lowercase, no
punctuation or articles) and checks whether a gold answer is a substring of the compressed context.

>>> normalize_answer("The  Beatles!")
'beatles'
>>> answer_in(["Wilhelm Conrad Röntgen"], "... awarded in 1901 to Wilhelm Conrad Röntgen, of Germany")
True
"""

from __future__ import annotations

import gzip
import json
import random
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

NQ_FILE = "nq-open-20_total_documents_gold_at_0.first441.jsonl.gz"
SHARED_NQ = Path(__file__).resolve().parents[2] / "shared" / "data" / NQ_FILE
POSITION_SEED = 1234

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass(frozen=True)
class DemoQuestion:
    """One question with its retrieved passages (``f"{title}\\n{text}"``, gold one at ``gold_index``)."""

    question: str
    answers: tuple[str, ...]
    chunks: tuple[str, ...]
    gold_index: int


def default_source() -> Path | None:
    """The shared NQ file when present (a clone with ``../shared/data``), else ``None`` (bundled sample)."""
    return SHARED_NQ if SHARED_NQ.is_file() else None


def load_questions(n: int, source: str | Path | None = None) -> tuple[list[DemoQuestion], str]:
    """The first ``n`` questions of ``source`` and a label saying where they came from.

    ``source``: a path to an NQ JSON Lines file (``.jsonl`` or ``.jsonl.gz``; records with ``ctxs``,
    gold first, which is moved to ``random.Random(1234 + i).randrange(len(ctxs))``, or records with
    ``passages`` and ``gold_index`` as in the bundled sample), or ``None`` for the bundled sample.
    """
    if source is None:
        ref = resources.files("semtoken_rag") / "data" / "sample_nq.jsonl"
        lines = ref.read_text(encoding="utf-8").splitlines()
        label = "bundled sample (semtoken_rag/data/sample_nq.jsonl)"
    else:
        path = Path(source)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = [line for _, line in zip(range(n), f)]
        label = str(path)
    out = []
    for i, line in enumerate(lines[:n]):
        if line.strip():
            out.append(_record(i, json.loads(line)))
    return out, label


def _record(i: int, rec: dict) -> DemoQuestion:
    if "ctxs" in rec:  # upstream layout: gold passage first
        ctxs = list(rec["ctxs"])
        gold = random.Random(POSITION_SEED + i).randrange(len(ctxs))
        ctxs.insert(gold, ctxs.pop(0))
    else:
        ctxs, gold = rec["passages"], int(rec["gold_index"])
    chunks = tuple(f"{c['title']}\n{c['text']}" for c in ctxs)
    return DemoQuestion(rec["question"], tuple(rec["answers"]), chunks, gold)


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def answer_in(answers: Iterable[str], context: str) -> bool:
    """True when a normalised gold answer is a substring of the normalised context."""
    ctx = normalize_answer(context)
    return any(a and a in ctx for a in map(normalize_answer, answers))
