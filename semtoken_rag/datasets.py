"""NaturalQuestions with retrieved passages ("Lost in the Middle", 20 documents) and answer matching.

The one loader behind the demo, the examples, the tests and the benchmarks. A source is an NQ JSON
Lines file (``.jsonl`` or ``.jsonl.gz``) or a folder holding :data:`NQ_FILE`; with no source, the
``SEMTOKEN_RAG_DATA`` environment variable names one, else the small sample bundled with the package
is used. The package never guesses where a repository keeps its data.

Upstream records hold the gold passage first; the loader moves it to a seeded random position, uniform over
the 20 (:func:`gold_position_for`), so that position is no shortcut. Only ``question``, ``answers`` and the passages' ``title``/``text`` are read: the
``isgold``/``hasanswer`` flags never reach a method (``gold_index`` is for analysis only).

Answer matching follows SQuAD normalisation (lowercase, no punctuation or articles) and checks
whether a gold answer is a substring of the context.

>>> normalize_answer("The  Beatles!")
'beatles'
>>> answer_in(["Wilhelm Conrad Röntgen"], "... awarded in 1901 to Wilhelm Conrad Röntgen, of Germany")
True
>>> answer_in([""], "anything")
False
>>> rec = load_nq(1)[0]  # the bundled sample
>>> rec.question, rec.answers, len(rec.chunks), rec.gold_index > 0
('who got the first nobel prize in physics', ('Wilhelm Conrad Röntgen',), 20, True)
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import string
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

NQ_FILE = "nq-open-20_total_documents_gold_at_0.first441.jsonl.gz"
DATA_ENV = "SEMTOKEN_RAG_DATA"  # an NQ file or a folder holding NQ_FILE
POSITION_SEED = 1234
BUNDLED_LABEL = "bundled sample (semtoken_rag/data/sample_nq.jsonl)"

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

GoldPosition = str | int


@dataclass(frozen=True)
class NQRecord:
    """One question with its retrieved passages (``f"{title}\\n{text}"``, the gold one at ``gold_index``).

    ``index`` is the record's line number in its source (0-based), ``titles`` the passages' titles in
    the order of ``chunks`` (see :meth:`passages`).
    """

    index: int
    question: str
    answers: tuple[str, ...]
    chunks: tuple[str, ...]
    titles: tuple[str, ...]
    gold_index: int

    def passages(self) -> list[tuple[str, str]]:
        """``(title, text)`` of every passage, in the order of ``chunks``."""
        return [(t, c[len(t) + 1:]) for t, c in zip(self.titles, self.chunks)]


def gold_position_for(question_index: int, gold_position: GoldPosition, n_passages: int = 20) -> int:
    """Where the gold passage of question ``question_index`` goes among ``n_passages``.

    ``"random"``: ``random.Random(1234 + question_index).randrange(n_passages)``: uniform over every
    position, seeded per question (the rule every committed benchmark result used);
    ``"first"``/``"middle"``/``"last"``: 0, ``n_passages // 2 - 1``, ``n_passages - 1``; an int: itself.

    >>> [gold_position_for(0, p) for p in ("first", "middle", "last", 4)]
    [0, 9, 19, 4]
    >>> sorted({gold_position_for(i, "random") for i in range(500)}) == list(range(20))
    True
    """
    if n_passages < 1:
        raise ValueError(f"n_passages must be at least 1, got {n_passages}")
    if gold_position == "random":
        return random.Random(POSITION_SEED + question_index).randrange(n_passages)
    named = {"first": 0, "middle": max(n_passages // 2 - 1, 0), "last": n_passages - 1}
    if isinstance(gold_position, str):
        if gold_position not in named:
            raise ValueError(f"gold position must be 'random', 'first', 'middle', 'last' or an int, "
                             f"got {gold_position!r}")
        return named[gold_position]
    if isinstance(gold_position, bool) or not isinstance(gold_position, int):
        raise TypeError(f"gold position must be a str or an int, got {type(gold_position).__name__}")
    if not 0 <= gold_position < n_passages:
        raise ValueError(f"gold position {gold_position} outside 0..{n_passages - 1}")
    return gold_position


def resolve_source(source: str | os.PathLike | None = None) -> Path | None:
    """The NQ file to read: ``source``, else ``$SEMTOKEN_RAG_DATA``, else ``None`` (the bundled sample).

    A folder stands for the :data:`NQ_FILE` inside it. A named source that does not exist raises
    ``FileNotFoundError`` naming it (no silent fallback to the sample).
    """
    if source is None:
        env = os.environ.get(DATA_ENV)
        if not env:
            return None
        source, origin = env, f"${DATA_ENV}"
    else:
        origin = "data source"
    path = Path(source)
    if path.is_dir():
        path = path / NQ_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{origin} {os.fspath(source)!r}: no NQ file at {path}")
    return path


def describe_source(path: Path | None) -> str:
    """A label for messages: the file's path, or the bundled sample's name."""
    return BUNDLED_LABEL if path is None else str(path)


def _lines(path: Path | None) -> Iterator[str]:
    if path is None:
        ref = resources.files("semtoken_rag") / "data" / "sample_nq.jsonl"
        yield from ref.read_text(encoding="utf-8").splitlines()
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        yield from fh


def example_data(start: str | os.PathLike | None = None) -> Path | None:
    """The NQ data an example or demo script run from a clone uses: ``$SEMTOKEN_RAG_DATA`` when set,
    else ``shared/data`` beside the clone (found by walking up from ``start``, default the current
    directory) when it holds :data:`NQ_FILE`, else ``None`` (the bundled sample). Only scripts call it;
    the library itself never looks for a repository's data.
    """
    if os.environ.get(DATA_ENV):
        return resolve_source()
    here = Path(start if start is not None else Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "shared" / "data" / NQ_FILE).is_file():
            return folder / "shared" / "data" / NQ_FILE
    return None


def load_nq(n: int | None = None, source: str | os.PathLike | None = None, gold_position: GoldPosition = "random",
            start: int = 0) -> list[NQRecord]:
    """Up to ``n`` questions from line ``start`` on (all when ``n`` is None), gold passage placed.

    ``source``: see :func:`resolve_source`. Records with ``ctxs`` (upstream layout, gold first) have the
    gold passage moved to :func:`gold_position_for`; moving it to index k reproduces the upstream
    ``gold_at_k`` file exactly. Records with ``passages`` and ``gold_index`` (the bundled sample) keep
    their order unless ``gold_position`` is not ``"random"``. Raises ``ValueError`` naming the line for
    a record that is not NQ JSON.
    """
    if n is not None and n < 0:
        raise ValueError(f"n must be None or >= 0, got {n}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    path = resolve_source(source)
    records: list[NQRecord] = []
    for i, line in enumerate(_lines(path)):
        if n is not None and len(records) >= n:
            break
        if i < start or not line.strip():
            continue
        try:
            records.append(_record(i, json.loads(line), gold_position))
        except (ValueError, KeyError, TypeError) as e:
            where = f"{describe_source(path)} line {i + 1}"
            raise ValueError(f"{where} is not an NQ record: {type(e).__name__}: {e}") from None
    return records


def _record(i: int, raw: dict, gold_position: GoldPosition) -> NQRecord:
    if "ctxs" in raw:  # upstream layout: the gold passage first
        ctxs = list(raw["ctxs"])
        gold = gold_position_for(i, gold_position, len(ctxs))
        ctxs.insert(gold, ctxs.pop(0))
    else:
        ctxs, gold = list(raw["passages"]), int(raw["gold_index"])
        if gold_position != "random":
            target = gold_position_for(i, gold_position, len(ctxs))
            ctxs.insert(target, ctxs.pop(gold))
            gold = target
    return NQRecord(index=i, question=str(raw["question"]), answers=tuple(map(str, raw["answers"])),
                    chunks=tuple(f"{c['title']}\n{c['text']}" for c in ctxs),
                    titles=tuple(str(c["title"]) for c in ctxs), gold_index=gold)


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD order)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def answer_in(answers: Iterable[str], context: str) -> bool:
    """True when a normalised gold answer (empty ones never match) is a substring of the normalised context."""
    ctx = normalize_answer(context)
    return any(a and a in ctx for a in map(normalize_answer, answers))
