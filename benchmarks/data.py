"""Loading the NQ 20-passage multi-document QA set ("Lost in the Middle") from the shared data folder.

Only ``question``, ``answers`` and the passages' ``title``/``text`` reach the methods; the
``isgold``/``hasanswer`` flags are never exposed (``gold_index`` is for analysis only).
"""

from __future__ import annotations

import gzip
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

NQ_FILE = "nq-open-20_total_documents_gold_at_0.first441.jsonl.gz"
N_PASSAGES = 20
POSITION_SEED = 1234

GoldPosition = str | int


@dataclass(frozen=True)
class NQRecord:
    index: int                  # line number in the file (0-based)
    question: str
    answers: tuple[str, ...]
    chunks: tuple[str, ...]     # f"{title}\n{text}" per passage, gold already moved
    gold_index: int             # where the gold passage sits in ``chunks`` (analysis only)
    titles: tuple[str, ...] = field(default=(), repr=False)

    def __getitem__(self, key: str):   # dict-style access for callers that prefer it
        return getattr(self, key)


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Explicit argument, then $SEMTOKEN_DATA_DIR, then <repo>/../shared/data, then /work/shared/data."""
    candidates = []
    if data_dir:
        candidates.append(Path(data_dir))
    elif os.environ.get("SEMTOKEN_DATA_DIR"):
        candidates.append(Path(os.environ["SEMTOKEN_DATA_DIR"]))
    else:
        candidates += [repo_root().parent / "shared" / "data", Path("/work/shared/data")]
    for c in candidates:
        if (c / NQ_FILE).exists():
            return c
    raise FileNotFoundError(
        f"{NQ_FILE} not found in {', '.join(str(c) for c in candidates)}; "
        "pass --data-dir or set SEMTOKEN_DATA_DIR"
    )


def gold_position_for(question_index: int, gold_position: GoldPosition, n_passages: int = N_PASSAGES) -> int:
    if gold_position == "random":
        return random.Random(POSITION_SEED + question_index).randrange(n_passages)
    if gold_position in ("first", "middle", "last"):
        return {"first": 0, "middle": 9, "last": n_passages - 1}[gold_position]
    pos = int(gold_position)
    if not 0 <= pos < n_passages:
        raise ValueError(f"gold position {pos} outside 0..{n_passages - 1}")
    return pos


def chunk_text(ctx: dict) -> str:
    return f"{ctx['title']}\n{ctx['text']}"


def load_nq(n: int | None = None, gold_position: GoldPosition = "random",
            data_dir: str | os.PathLike | None = None, start: int = 0) -> list[NQRecord]:
    """Load the first ``n`` questions (after ``start``) with the gold passage moved.

    ``gold_position``: "random" (position ``random.Random(1234 + question_index).randrange(20)``),
    an int index, or "first"/"middle"/"last" (0, 9, 19). Moving ``ctxs[0]`` to index k reproduces
    the upstream ``gold_at_k`` file exactly.
    """
    path = resolve_data_dir(data_dir) / NQ_FILE
    records: list[NQRecord] = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i < start:
                continue
            if n is not None and len(records) >= n:
                break
            raw = json.loads(line)
            ctxs = list(raw["ctxs"])
            gold = ctxs.pop(0)           # the file holds the gold passage at index 0
            pos = gold_position_for(i, gold_position, len(ctxs) + 1)
            ctxs.insert(pos, gold)
            records.append(NQRecord(
                index=i,
                question=raw["question"],
                answers=tuple(raw["answers"]),
                chunks=tuple(chunk_text(c) for c in ctxs),
                gold_index=pos,
                titles=tuple(c["title"] for c in ctxs),
            ))
    return records
