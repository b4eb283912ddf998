"""Issue 11 point 5: structure is a unit, fences stay balanced, query numbers match exactly, `protect`."""

from __future__ import annotations

import re

import pytest

from semtoken_rag import SemToken, SemTokenConfig

pytestmark = pytest.mark.slow  # the real encoder

TABLE = """Yearly results of the company, in millions of euros.

| Year | Revenue | Profit |
|------|---------|--------|
| 2019 | 10.1 | 1.2 |
| 2020 | 11.4 | 1.5 |
| 2021 | 12.9 | 2.3 |
| 2022 | 13.3 | 2.1 |
"""

CODE = """Install the package and run the example.

```python
from semtoken_rag import SemToken
engine = SemToken()
res = engine.compress(chunks, query, rate=0.3)
print(res.chunks[0].text)
```

The result holds the kept text of every chunk, in order, with the spans that were kept."""


def rows(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.startswith("|")]


def test_query_year_keeps_its_table_row_whole(engine):
    res = engine.compress([TABLE], "profit in 2021?", rate=0.5)
    text = res.chunks[0].text
    assert "| 2021 | 12.9 | 2.3 |" in text
    # every kept piece of a row is the whole row (a row is one segment)
    for piece in re.split(r" … |\n", text):
        if piece.startswith("|"):
            assert piece in TABLE.split("\n"), piece


def test_query_number_bonus_decides_between_rows():
    """MiniLM alone ranks rows of near-equal years almost alike: without the exact-number bonus (and without
    the lexical evidence, which also matches "2019" word for word) "profit in 2019?" keeps another year's
    row; with it, every year named keeps its own row."""
    with_bonus = SemToken(device="cpu", target_tokens=12)
    without = SemToken(device="cpu", target_tokens=12, exact_number_weight=0.0, lexical_weight=0.0)
    table = "| 2018 | 1.1 |\n| 2019 | 1.2 |\n| 2020 | 1.5 |\n| 2021 | 2.3 |"
    for line in table.split("\n"):
        year = line.split()[1]
        assert with_bonus.compress([table], f"profit in {year}?").chunks[0].text == line
    assert without.compress([table], "profit in 2019?").chunks[0].text != "| 2019 | 1.2 |"
    # the long table at rate 0.5, as in the issue
    kept = SemToken(device="cpu", exact_number_weight=0.0, lexical_weight=0.0).compress([TABLE], "profit in 2019?",
                                                                                     rate=0.5)
    assert "| 2019 |" not in kept.chunks[0].text
    kept = SemToken(device="cpu", exact_number_weight=0.0).compress([TABLE], "profit in 2019?", rate=0.5)
    assert "| 2019 | 10.1 | 1.2 |" in kept.chunks[0].text  # the lexical evidence alone finds it too
    kept = SemToken(device="cpu").compress([TABLE], "profit in 2019?", rate=0.5)
    assert "| 2019 | 10.1 | 1.2 |" in kept.chunks[0].text


@pytest.mark.parametrize("rate", [0.2, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("query", ["how do I compress chunks in python?", "what does the result hold?", None])
def test_code_block_fences_stay_balanced(engine, rate, query):
    res = engine.compress([CODE], query, rate=rate)
    text = res.chunks[0].text
    assert res.compressed_tokens <= res.budget
    assert not text.lstrip().startswith("```") or text.count("```") % 2 == 0
    assert text.count("```") % 2 == 0, text
    # a kept code line comes whole, unless the budget cannot hold it (then a run of its words)
    code_lines = CODE.split("```python\n")[1].split("\n```")[0].split("\n")
    for piece in re.split(r" … |\n", text):
        if "engine" in piece and "=" in piece:
            assert piece in code_lines or (res.budget < engine.count_tokens(CODE) * 0.25
                                           and any(piece in line for line in code_lines)), piece


def test_kept_code_comes_with_its_fences(engine):
    res = engine.compress([CODE], "how do I call engine.compress with a rate?", rate=0.7)
    text = res.chunks[0].text
    assert "res = engine.compress(chunks, query, rate=0.3)" in text
    assert text.count("```") == 2


def test_fence_of_an_unclosed_block_is_never_kept(engine):
    cut = CODE.split("print(")[0]  # a retriever chunk cut inside the code
    for rate in (0.3, 0.6, 0.9):
        text = engine.compress([cut], "how do I compress chunks in python?", rate=rate).chunks[0].text
        assert "```" not in text, text


def test_list_items_are_segments(engine):
    doc = ("Steps to install.\n1. Download the archive. Check its checksum.\n"
           "2. Unpack it into the folder. Keep the layout.\n3. Run the installer as administrator.")
    res = engine.compress([doc], "how to unpack the archive", rate=0.4)
    items = doc.split("\n")
    for piece in res.chunks[0].text.split(" … "):
        for line in piece.split("\n"):
            if line[:2] in ("1.", "2.", "3."):
                assert line in items, line


PROTECTED = ("Support: write to jane.doe@example.org or open https://example.org/support/tickets/new "
             "before 2024-03-15 for the spring release. Other questions about billing, invoices, "
             "refunds and accounts go to the general desk, which answers within two working days.")
PATTERNS = [r"[\w.+-]+@[\w-]+\.[\w.]+", r"https?://\S+", r"\d{4}-\d{2}-\d{2}"]


@pytest.mark.parametrize("target", [2, 3, 5, 8, 12, 20, 30])
def test_protected_matches_are_never_cut(target):
    engine = SemToken(device="cpu", protect=PATTERNS)
    res = engine.compress([PROTECTED], "how do I contact support before the release date?", target_tokens=target)
    text = res.chunks[0].text
    assert res.compressed_tokens <= res.budget
    for p in PATTERNS:
        whole = re.search(p, PROTECTED).group(0)
        for s, e in res.chunks[0].kept_spans:
            m = re.search(p, PROTECTED)
            overlap = min(e, m.end()) - max(s, m.start())
            assert overlap <= 0 or (s <= m.start() and e >= m.end()), (text, whole)


def test_protected_text_is_kept_whenever_its_segment_is():
    engine = SemToken(device="cpu", protect=PATTERNS)
    res = engine.compress([PROTECTED], "support e-mail address and ticket link", rate=0.8)
    text = res.chunks[0].text
    kept = [re.search(p, PROTECTED).group(0) for p in PATTERNS if re.search(p, PROTECTED).group(0) in text]
    assert kept, text  # the support sentence is kept, and with it every match in it
    assert all(re.search(p, PROTECTED).group(0) in text for p in PATTERNS), text


def test_protect_is_validated():
    with pytest.raises(ValueError, match=r"'\(unclosed' is not a valid regex"):
        SemTokenConfig(protect=["(unclosed"])
    with pytest.raises(ValueError, match="not a single string"):
        SemTokenConfig(protect=r"\d+")
    with pytest.raises(ValueError, match="non-empty regex strings"):
        SemTokenConfig(protect=[""])
    assert SemTokenConfig(protect=[r"\d+"]).protect == (r"\d+",)
