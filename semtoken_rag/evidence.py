"""Cheap evidence beside the encoder's: words of the query matched exactly, what kind of answer the
question asks for, and whether a near-repeat carries something its better-ranked copy lacks.

MiniLM's matching misses names, numbers and rare words that a question and its answer sentence share
word for word; these signals cost a pass over the call's words, nothing on the device.

* :func:`lexical_scores`: BM25 over the segments of one call (the call's segments are the collection,
  so a term's rarity is its rarity among the retrieved text), words lower-cased and stemmed (Snowball,
  via PyStemmer), question and function words ignored.
* :func:`answer_type` and :func:`type_hits`: "when" asks for a date or a year, "how many"/"how much"
  for a number, "who" for a name.
* :func:`carries_new_facts`: the words that make a near-repeat worth keeping (numbers, names).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence

import numpy as np

from .lru import remember

__all__ = ["ANSWER_TYPES", "answer_type", "carries_new_facts", "facts", "lexical_scores",
           "lexical_scores_of_codes", "query_terms", "query_words", "term_codes", "type_hits", "unit_terms", "word_term_codes"]

# function words and question words: never evidence on their own
_STOP = frozenset(["a", "about", "above", "after", "again", "against", "all", "also", "am", "an", "and", "any", "are", "as", "at", "be", "because", "been", "before", "being", "below", "between", "both", "but", "by", "can", "could", "did", "do", "does", "doing", "down", "during", "each", "few", "for", "from", "further", "had", "has", "have", "having", "he", "her", "here", "hers", "him", "his", "how", "i", "if", "in", "into", "is", "it", "its", "itself", "just", "me", "more", "most", "my", "no", "nor", "not", "now", "of", "off", "on", "once", "only", "or", "other", "our", "out", "over", "own", "same", "she", "should", "so", "some", "such", "than", "that", "the", "their", "theirs", "them", "then", "there", "these", "they", "this", "those", "through", "to", "too", "under", "until", "up", "very", "was", "we", "were", "what", "when", "where", "which", "while", "who", "whom", "whose", "why", "will", "with", "would", "you", "your", "yours", "many", "much"])
_WORD = re.compile(r"\w+")
_local = threading.local()  # a Snowball stemmer is not safe to share between threads
# word -> its term's code (word_term_codes): a language's words recur, so a new chunk's are mostly known;
# at most this many, then it starts afresh (about 7.5 MB when full of NQ words)
_CODE_MEMO: dict[str, int] = {}
_CODE_MEMO_MAX = 1 << 16


def _stemmer():
    st = getattr(_local, "stemmer", None)
    if st is None:
        import Stemmer

        st = _local.stemmer = Stemmer.Stemmer("english")
    return st


def _normal(word: str) -> str:
    """``word`` lower-cased, all but its word characters (``\\w``) removed.

    >>> _normal("Röntgen's,"), _normal("1,901"), _normal("(—)")
    ('röntgens', '1901', '')
    """
    low = word.lower()
    return low if low.isalnum() else "".join(_WORD.findall(low))  # (isalnum: every character is \w)


def unit_words(text: str, units: np.ndarray) -> list[str]:
    """:func:`_normal` of each unit (word) of ``text``: what :func:`unit_terms` and :func:`type_hits` read.

    >>> from semtoken_rag.text import split_units
    >>> t = "Röntgen's prize (1901)."
    >>> unit_words(t, split_units(t))
    ['röntgens', 'prize', '1901']
    """
    low = text.lower()
    if len(low) != len(text) or "\u03a3" in text:  # lower-casing moved offsets, or a context-dependent Σ
        return [_normal(text[s:e]) for s, e in units.tolist()]
    words = [low[s:e] for s, e in units.tolist()]  # (the text lower-cased once: the same words, faster)
    return [w if w.isalnum() else "".join(_WORD.findall(w)) for w in words]


def unit_terms(text: str, units: np.ndarray, words: list[str] | None = None) -> list[str]:
    """The search term of each unit (word) of ``text``: lower-cased, punctuation removed, stemmed; ``""``
    for punctuation alone and for stop words.

    >>> from semtoken_rag.text import split_units
    >>> t = "The Prizes were awarded (1901) to Röntgen."
    >>> unit_terms(t, split_units(t))
    ['', 'prize', '', 'award', '1901', '', 'röntgen']
    """
    words = unit_words(text, units) if words is None else words
    stems = _stemmer().stemWords(words)
    return ["" if (not w or w in _STOP) else s for w, s in zip(words, stems)]


def query_terms(query: str) -> list[str]:
    """The distinct search terms of ``query``, in order.

    >>> query_terms("Who got the first Nobel prize in physics? Nobel prizes!")
    ['got', 'first', 'nobel', 'prize', 'physic']
    """
    words = [_normal(w) for w in query.split()]
    stems = _stemmer().stemWords(words)
    return list(dict.fromkeys(s for w, s in zip(words, stems) if w and w not in _STOP))


def query_words(query: str) -> frozenset[str]:
    """The words of ``query`` normalised as candidate words are (lower-cased, punctuation removed): what
    :func:`type_hits` must never offer as an answer, with the query's stemmed terms.

    >>> sorted(query_words("Who played Quint in 'Jaws'?"))
    ['in', 'jaws', 'played', 'quint', 'who']
    """
    return frozenset(w for w in (_normal(x) for x in query.split()) if w)


def lexical_scores(terms: Sequence[str], q_terms: Sequence[str], segs: np.ndarray, *, k1: float = 1.2,
                   b: float = 0.75) -> np.ndarray:
    """BM25 of each segment (``segs``: unit bounds) for the query terms, divided by the best segment's
    score so that it lies in [0, 1] (all zeros when no query term occurs). ``terms`` holds the term of
    each unit of the call (:func:`unit_terms`); the call's segments are the collection.

    >>> terms = ["nobel", "prize", "", "physic", "banana", "", "nobel", "", "", ""]
    >>> lexical_scores(terms, ["nobel", "physic"], np.array([0, 4, 6, 10])).round(3).tolist()
    [1.0, 0.0, 0.514]
    """
    return lexical_scores_of_codes(term_codes(terms), q_terms, segs, k1=k1, b=b)


def term_codes(terms: Sequence[str]) -> np.ndarray:
    """The int64 codes :func:`lexical_scores_of_codes` reads: each term's hash (Python's string hash,
    equal for equal terms within a process, which is all a memo of them lives for)."""
    return np.fromiter(map(hash, terms), dtype=np.int64, count=len(terms))


def word_term_codes(words: Sequence[str]) -> np.ndarray:
    """``term_codes(unit_terms(text, units, words))`` of a chunk's :func:`unit_words`, the same codes,
    through a process-wide memo of the words met before (stemming a word costs more than looking it up;
    thread-safe: a lookup or an insertion is one dict operation, stemming uses the thread's stemmer).

    >>> from semtoken_rag.text import split_units
    >>> t = "The Prizes were awarded (1901) to Röntgen."
    >>> word_term_codes(unit_words(t, split_units(t))).tolist() == term_codes(unit_terms(t, split_units(t))).tolist()
    True
    """
    memo = _CODE_MEMO
    codes = list(map(memo.get, words))
    todo = [i for i, c in enumerate(codes) if c is None]
    if todo:
        new = [words[i] for i in todo]
        fresh = {w: hash("" if (not w or w in _STOP) else s) for w, s in zip(new, _stemmer().stemWords(new))}
        for i, w in zip(todo, new):
            codes[i] = fresh[w]
        remember(memo, fresh, _CODE_MEMO_MAX)
    return np.fromiter(codes, dtype=np.int64, count=len(codes))


def lexical_scores_of_codes(codes: np.ndarray, q_terms: Sequence[str], segs: np.ndarray, *, k1: float = 1.2,
                            b: float = 0.75) -> np.ndarray:
    """:func:`lexical_scores` of the units' :func:`term_codes` (integers compare faster than strings: a
    call's 3,000 units; two different terms with one 64-bit hash would count as one).

    >>> terms = ["nobel", "prize", "", "physic", "banana", "", "nobel", "", "", ""]
    >>> lexical_scores_of_codes(term_codes(terms), ["nobel", "physic"], np.array([0, 4, 6, 10])).round(3).tolist()
    [1.0, 0.0, 0.514]
    """
    n_seg = len(segs) - 1
    out = np.zeros(n_seg)
    if n_seg == 0 or not q_terms:
        return out
    arr = np.asarray(codes, dtype=np.int64)
    content = np.add.reduceat((arr != hash("")).astype(np.float64), segs[:-1])
    length = np.maximum(content, 1.0)
    norm = k1 * (1.0 - b + b * length / max(length.mean(), 1.0))
    for t in q_terms:
        tf = np.add.reduceat((arr == hash(t)).astype(np.float64), segs[:-1])
        df = int((tf > 0).sum())
        if df == 0:
            continue
        idf = np.log(1.0 + (n_seg - df + 0.5) / (df + 0.5))
        out += idf * tf * (k1 + 1.0) / (tf + norm)
    top = out.max()
    return out / top if top > 0 else out


# -- answer types ------------------------------------------------------------------------------------
ANSWER_TYPES = ("date", "number", "name")
_MONTHS = frozenset(["january", "february", "march", "april", "may", "june", "july", "august", "september", "october", "november", "december"])
_NUMBER_WORDS = frozenset(["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "thousand", "million", "billion", "trillion", "dozen", "half"])
_YEAR = re.compile(r"^(1[0-9]{3}|20[0-9]{2})s?$")
_DIGITS = re.compile(r"\d")
_TYPE_RULES = (
    (re.compile(r"^(when\b|what (year|date|day|month|century|decade)\b|which (year|date|century)\b|"
                r"in what year\b|in which year\b|(what|which) time\b)"), "date"),
    (re.compile(r"^(how (many|much|long|old|far|tall|big|high|deep|fast|often|large)\b|"
                r"what (percentage|percent|number|amount|age|population)\b)"), "number"),
    (re.compile(r"^(who|whom|whose)\b"), "name"),
)


def answer_type(query: str) -> str | None:
    """What kind of answer ``query`` asks for, by its question words: ``"date"``, ``"number"``,
    ``"name"`` or None (the question word may come after a clause: "in 1969, who ...").

    >>> [answer_type(q) for q in ("when did the war end", "how many moons does mars have",
    ...                            "who sings hotel california", "where is the eiffel tower")]
    ['date', 'number', 'name', None]
    """
    q = " ".join(_WORD.findall(query.lower()))
    for start in [0, *(m.end() + 1 for m in re.finditer(r"\b\w+\b", q))][:8]:
        tail = q[start:]
        for rule, kind in _TYPE_RULES:
            if rule.match(tail):
                return kind
    return None


def type_hits(text: str, units: np.ndarray, kind: str | None, exclude: frozenset[str] = frozenset(),
              words: list[str] | None = None) -> np.ndarray:
    """Per unit of ``text``, True when the unit is a candidate answer of ``kind``: a year or a month name
    (date); a written number (number); a capitalised word that does not start a sentence (name). Words of
    the query (``exclude``, lower-cased) are never candidates: the answer is what the question lacks.

    >>> from semtoken_rag.text import split_units
    >>> t = "It was built in 1889 by Gustave Eiffel. Paris has 20 districts."
    >>> u = split_units(t)
    >>> [t[s:e] for (s, e), h in zip(u.tolist(), type_hits(t, u, "date")) if h]
    ['1889']
    >>> [t[s:e] for (s, e), h in zip(u.tolist(), type_hits(t, u, "name", frozenset({"paris"}))) if h]
    ['Gustave', 'Eiffel.']
    """
    out = np.zeros(len(units), dtype=bool)
    if kind is None or len(units) == 0:
        return out
    spans = units.tolist()
    words = [_normal(text[s:e]) for s, e in spans] if words is None else words
    if kind == "date":  # (a year starts with a digit)
        hits = [i for i, w in enumerate(words) if w in _MONTHS or (w[:1].isdigit() and _YEAR.match(w))]
    elif kind == "number":
        hits = [i for i, w in enumerate(words) if w in _NUMBER_WORDS or _DIGITS.search(w)]
    else:  # a capitalised word that does not start a sentence (the first word of a text starts one)
        hits = [i for i in range(1, len(spans)) if text[spans[i][0]].isupper() and not _ends_sentence(
            text[spans[i - 1][0]:spans[i - 1][1]]) and words[i] not in _STOP and not words[i].isdigit()]
    out[[i for i in hits if words[i] and words[i] not in exclude]] = True
    return out


def _ends_sentence(raw: str) -> bool:
    return raw.rstrip("\"')]»”’").endswith((".", "!", "?", ":", "\n")) or not raw.strip()


def facts(text: str, units: np.ndarray) -> frozenset[str]:
    """Numbers and capitalised words (stop words aside) of a piece of text, normalised, and each pair of
    them that stand side by side ("April 1917" is a fact of its own beside "April" and "1917")."""
    out: set[str] = set()
    prev = ""
    for s, e in units.tolist():
        raw = text[s:e]
        word = _normal(raw)
        fact = word if word and word not in _STOP and (_DIGITS.search(word) or raw[:1].isupper()) else ""
        if fact:
            out.add(fact)
            if prev:
                out.add(prev + " " + fact)
        prev = fact
    return frozenset(out)


def carries_new_facts(text_a: str, units_a: np.ndarray, text_b: str, units_b: np.ndarray) -> bool:
    """True when piece A holds a number or a name, or such a pair of words side by side, that piece B does
    not: a near-repeat of B that still says something B does not. "April 1917" (the answer to "when did
    the US enter World War I") is not in "April 6, 1917".

    >>> from semtoken_rag.text import split_units
    >>> def new(a, b):
    ...     return carries_new_facts(a, split_units(a), b, split_units(b))
    >>> new("The US entered the war in April 1917.", "The US entered the war on April 6, 1917.")
    True
    >>> new("The US entered the war in April 1917.", "In April 1917 the US entered the war.")
    False
    """
    return bool(facts(text_a, units_a) - facts(text_b, units_b))
