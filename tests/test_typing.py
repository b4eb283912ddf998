"""The package ships py.typed: a user's plain mypy (no pydantic plugin) must accept the documented API.

Field defaults given positionally (``Field(0.9, ge=0)``) are invisible to type checkers: every
``SemTokenConfig(...)`` call was then an error for each field not passed (53 of them). Unit tier: mypy on
a user's snippet, with the heavy dependencies skipped (about 2 s).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api", reason="mypy is in the dev extra")

ROOT = Path(__file__).resolve().parents[1]

USER_CODE = '''
    from semtoken_rag import CompressionResult, SemToken, SemTokenConfig

    cfg = SemTokenConfig(rate=0.2, tau=0.85, tokenizer="cl100k_base", device="cpu")
    other: SemTokenConfig = SemTokenConfig()
    narrower = cfg.model_copy(update={"rate": 0.1})

    def run(engine: SemToken) -> int:
        res: CompressionResult = engine.compress(["a chunk"], "a query", rate=0.3, chunk_overheads=[2])
        spans: tuple[tuple[int, int], ...] = res.chunks[0].kept_spans
        return res.compressed_tokens + res.overhead_tokens + len(spans) + engine.count_tokens("x")
'''

BAD_CODE = '''
    from semtoken_rag import SemTokenConfig

    SemTokenConfig(rate="a third")
'''

SKIPPED = ("torch", "transformers", "tokenizers", "faiss", "sentencex", "quicktok", "Stemmer", "regex",
           "xxhash", "numpy", "redis")


def _mypy(tmp_path: Path, code: str) -> tuple[str, int]:
    (tmp_path / "user.py").write_text(textwrap.dedent(code), encoding="utf-8")
    (tmp_path / "mypy.ini").write_text(
        "[mypy]\nfollow_imports = silent\nmypy_path = " + str(ROOT) + "\n"
        f"[mypy-{','.join(m + '.*' for m in SKIPPED)}]\nfollow_imports = skip\n", encoding="utf-8")
    out, err, status = mypy_api.run(["--no-incremental", "--config-file", str(tmp_path / "mypy.ini"),
                                     str(tmp_path / "user.py")])
    return out + err, status


def test_plain_mypy_accepts_the_documented_api(tmp_path):
    out, status = _mypy(tmp_path, USER_CODE)
    assert status == 0, out


def test_plain_mypy_still_catches_a_wrong_type(tmp_path):
    out, status = _mypy(tmp_path, BAD_CODE)  # (the check is not vacuous: field types are seen)
    assert status == 1 and 'Argument "rate" to "SemTokenConfig" has incompatible type "str"' in out, out
