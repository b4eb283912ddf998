"""Helpers of :class:`SemTokenNodePostprocessor`: the event, engine settings, LlamaIndex's tokenizer,
the budget of what the LLM reads, rebuilt nodes (internal)."""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from typing import Any

from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore

from semtoken_rag import CompressionResult, SemToken, SemTokenConfig
from semtoken_rag.config import check_budget, sequence_of

METADATA_KEY = "semtoken"
SEPARATOR = "\n\n"  # how LlamaIndex's synthesizers and chat engines join node contents


class SemTokenCompressionEvent(BaseEvent):
    """Token counts of one compression call, emitted through LlamaIndex instrumentation.

    ``context_tokens``: the uncompressed context as the LLM would read it (headers and separators
    included); ``budget``: its share allowed; ``compressed_tokens + overhead_tokens``: what was kept.
    """

    original_tokens: int
    compressed_tokens: int
    overhead_tokens: int
    budget: int
    context_tokens: int
    nodes_in: int
    nodes_out: int

    @classmethod
    def class_name(cls) -> str:
        return "SemTokenCompressionEvent"


class TokenListLength:
    """A LlamaIndex tokenizer (text -> list of ids) as a token counter (text -> int); picklable."""

    def __init__(self, tokenize: Any) -> None:
        self.tokenize = tokenize

    def __call__(self, text: str) -> int:
        return len(self.tokenize(text))


_WRAPPED: dict[int, tuple[Any, TokenListLength]] = {}
_WRAPPED_LOCK = threading.Lock()


def settings_tokenizer() -> TokenListLength | None:
    """The tokenizer a user set through ``Settings.tokenizer``, as a counter; None when unset or when it
    is LlamaIndex's own default (tiktoken's gpt-3.5 encoding, which ``get_tokenizer()`` installs)."""
    import llama_index.core

    tok = llama_index.core.global_tokenizer  # read without triggering LlamaIndex's default
    if tok is None or _is_llamaindex_default(tok):
        return None
    held = _WRAPPED.get(id(tok))
    if held is None or held[0] is not tok:  # one counter per tokenizer: one registry engine
        with _WRAPPED_LOCK:  # (concurrent first queries: one of them makes it, all get that one)
            held = _WRAPPED.get(id(tok))
            if held is None or held[0] is not tok:
                held = _WRAPPED[id(tok)] = (tok, TokenListLength(tok))
    return held[1]


def _is_llamaindex_default(tok: Any) -> bool:
    """Whether ``tok`` is what ``llama_index.core.utils.get_tokenizer()`` installs: gpt-3.5's tiktoken
    encoding (cl100k_base) as ``partial(enc.encode, allowed_special="all")`` (the same set by hand is
    taken for it; another encoding wrapped so is the user's)."""
    owner = getattr(getattr(tok, "func", None), "__self__", None)
    return (isinstance(tok, functools.partial) and tok.keywords == {"allowed_special": "all"}
            and type(owner).__module__.startswith("tiktoken") and getattr(owner, "name", None) == "cl100k_base")


def scored_nodes(nodes: Any) -> list[NodeWithScore]:
    """``nodes`` as a list, each checked to be a ``NodeWithScore`` (what a postprocessor is given)."""
    if isinstance(nodes, BaseNode):
        raise TypeError(f"nodes must be a sequence of NodeWithScore, got a single {type(nodes).__name__}")
    return sequence_of(nodes, NodeWithScore, "nodes",
                       lambda n: " (wrap it: NodeWithScore(node=...))" if isinstance(n, BaseNode) else "")


def engine_config(config: SemTokenConfig | None, **overrides: Any) -> SemTokenConfig:
    """``config`` (default settings when None) with the non-None ``overrides`` applied, re-validated."""
    base = config if config is not None else SemTokenConfig()
    given = {k: v for k, v in overrides.items() if v is not None}
    return SemTokenConfig(**{**dict(base), **given}) if given else base


def plan(engine: SemToken, nodes: list[NodeWithScore], mode: MetadataMode, rate: float | None,
         target: int | None) -> dict[str, Any]:
    """Texts, per-node overheads (header in ``mode`` + separator) and the budget of one call; the nodes
    that pass through (no text, but media or a metadata header), and what is left of the budget for
    the texts once what the LLM reads of those (header and separator) is taken from it."""
    check_budget(rate, target)  # (again: model_copy(update=...) skips the fields' validation)
    texts = node_texts(nodes)
    shown = [n.node.get_content(metadata_mode=mode).strip() for n in nodes]
    counts = [engine.count_tokens(t) for t in texts]
    sep = engine.count_tokens(SEPARATOR)
    # header + one separator per kept node but the first (charging all but node 0 is never short); the
    # header is what the node shows beyond its text, which the LLM reads stripped (as compressed text is)
    bare = [engine.count_tokens(t.strip()) if t != t.strip() else c for t, c in zip(texts, counts)]
    overheads = [max(engine.count_tokens(s) - c, 0) + (sep if i else 0)
                 for i, (s, c) in enumerate(zip(shown, bare))]
    context = engine.count_tokens(SEPARATOR.join(s for s in shown if s))
    cfg = engine.config
    if target is None and rate is None:
        target = cfg.target_tokens
    rate = rate if rate is not None else cfg.rate
    budget = target if target is not None else math.floor(rate * context + 1e-9)
    if target is None and rate >= 1.0:  # keeps everything: the charges above may pass the
        budget = max(budget, sum(counts) + sum(overheads))  # joined context's own count by a few tokens
    passed = [not t.strip() and bool(s or _has_media(n.node)) for t, s, n in zip(texts, shown, nodes)]
    # what the LLM reads of them: all of what they show (whitespace text included) and a separator
    reserved = sum(engine.count_tokens(s) + (sep if i else 0) for i, (p, s) in enumerate(zip(passed, shown)) if p and s)
    return {"texts": texts, "overheads": overheads, "budget": int(budget), "context_tokens": context,
            "counts": counts, "passed": passed, "text_budget": int(budget) - reserved,
            "context_excess": context_excess(engine, nodes, mode, passed, int(budget))}


def node_texts(nodes: list[NodeWithScore]) -> list[str]:
    """Each node's text without metadata (what is compressed), or a ``TypeError`` naming the first node whose
    text is not a str (a node built with ``model_construct`` or assigned to takes any value)."""
    texts = []
    for i, n in enumerate(nodes):
        text = n.node.get_content(metadata_mode=MetadataMode.NONE)
        if not isinstance(text, str):
            raise TypeError(f"nodes[{i}].node.text must be a str, got {type(text).__name__}")
        texts.append(text)
    return texts


def context_excess(engine: SemToken, nodes: list[NodeWithScore], mode: MetadataMode, passed: list[bool],
                   limit: int) -> Callable[[list[str]], int]:
    """The engine's check of what the LLM reads: each node that keeps text as LlamaIndex shows it in
    ``mode`` (its header and the kept text, stripped), the passed-through nodes as they are, joined by
    :data:`SEPARATOR` and counted whole, minus the budget. The per-node charges are an estimate that a
    header or text edges the tokenizer merges with can pass."""
    through = {i: nodes[i].node.get_content(metadata_mode=mode).strip() for i, p in enumerate(passed) if p}

    def excess(texts: list[str]) -> int:
        parts = []
        for i, (nws, text) in enumerate(zip(nodes, texts)):
            if i in through:
                shown = through[i]
            elif not text:
                continue
            else:
                node = nws.node.model_copy()  # (shallow: set_content assigns, the input is not touched)
                node.set_content(text)
                shown = node.get_content(metadata_mode=mode).strip()
            if shown:
                parts.append(shown)
        return engine.count_tokens(SEPARATOR.join(parts)) - limit
    return excess


_MEDIA = ("image", "image_path", "image_url", "image_resource", "audio_resource", "video_resource")


def _has_media(node: Any) -> bool:
    """Whether a node holds content other than text (an ``ImageNode``'s image, a ``Node``'s media)."""
    return any(getattr(node, name, None) is not None for name in _MEDIA)


def event(result: CompressionResult, p: dict[str, Any], n_in: int, n_out: int) -> SemTokenCompressionEvent:
    return SemTokenCompressionEvent(
        original_tokens=result.original_tokens, compressed_tokens=result.compressed_tokens,
        overhead_tokens=result.overhead_tokens, budget=p["budget"], context_tokens=p["context_tokens"],
        nodes_in=n_in, nodes_out=n_out)


def _excluded(keys: list[str]) -> list[str]:
    return [*keys] if METADATA_KEY in keys else [*keys, METADATA_KEY]


def rebuild(nodes: list[NodeWithScore], result: CompressionResult, passed: list[bool],
            texts: list[str]) -> list[NodeWithScore]:
    """Copies of the nodes that kept something, text replaced, and of the ``passed`` ones (no text),
    content untouched, in input order; inputs untouched (``texts``: their texts, as compressed).

    ``start_char_idx``/``end_char_idx`` stay: they locate the node's original text in its source
    document. The kept slices are ``metadata["semtoken"]["kept_spans"]`` (offsets into the node's
    original text) and, when the node's text is as long as its source span ``[start_char_idx:end_char_idx]``
    (the source's text is not at hand to compare: a sentence window put in its place, or text compressed
    before, is not as long), ``source_spans`` (the same slices as offsets into the source document).
    """
    out = []
    for nws, chunk, through, text in zip(nodes, result.chunks, passed, texts):
        if chunk.is_empty and not through:
            continue
        node = nws.node
        info = chunk.to_dict()
        start, end = getattr(node, "start_char_idx", None), getattr(node, "end_char_idx", None)
        if isinstance(start, int) and isinstance(end, int) and end - start == len(text):
            info["source_spans"] = [[start + a, start + b] for a, b in chunk.kept_spans]
        new = node.model_copy(update={
            "metadata": {**node.metadata, METADATA_KEY: info},
            "excluded_llm_metadata_keys": _excluded(node.excluded_llm_metadata_keys),
            "excluded_embed_metadata_keys": _excluded(node.excluded_embed_metadata_keys),
            "relationships": dict(node.relationships),
        })
        if not through:  # (an image node's content is its image)
            new.set_content(chunk.text)
        out.append(nws.model_copy(update={"node": new}))
    return out
