"""One loaded engine per configuration and process, shared by every face (integrations, CLI).

Loading an engine costs seconds (torch, the encoder's weights) and each engine holds its own
fingerprint cache, so components built with the same settings share one. The registry is keyed by
the validated configuration; a configuration that cannot be serialised (a tokenizer object, a
callable) is keyed by that object's identity. Engines whose settings differ only in what they do
with fingerprints (budget tokenizer, weights, rate) share one encoder, fingerprint cache and query
memo (:class:`semtoken_rag.engine.EncoderParts`): one model in memory, and a chunk that one of them
(or a fingerprinter) encoded is a cache hit for all. It keeps the 64 engines asked for most recently.

>>> from semtoken_rag import SemTokenConfig
>>> from semtoken_rag.registry import config_key
>>> config_key(SemTokenConfig(rate=0.2)) == config_key(SemTokenConfig(rate=0.2))
True
>>> config_key(SemTokenConfig(rate=0.2)) == config_key(SemTokenConfig())
False
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from .config import SemTokenConfig

if TYPE_CHECKING:
    from .engine import EncoderParts, SemToken

logger = logging.getLogger(__name__)

_LOCK = threading.Lock()


def _renew_lock() -> None:  # (in a child made by fork: a thread of the parent building an engine held it)
    global _LOCK
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_lock)
# the registry holds at most this many engines, the least recently asked for going first (closed: a component
# that still holds one keeps working with it, encoding on its own); settings are usually a handful per
# process, so more means a setting new at each request, which the first eviction warns about, once
_MAX_ENGINES = 64
_ENGINES: OrderedDict[str, SemToken] = OrderedDict()
_warned_evicting = False
_PARTS: dict[str, EncoderParts] = {}


def _default(value: Any) -> str:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if inspect.ismethod(value):  # ``counter.count`` is a new object at each attribute access: keyed by what it
        # binds (the registered engine's config holds the object, so its id is not reused while keyed)
        return f"<method {value.__func__.__qualname__} of {type(value.__self__).__qualname__} at " \
               f"{id(value.__self__):#x}>"
    # other non-JSON values (a tokenizer object, a callable): identity, so two objects never share
    return f"<{type(value).__qualname__} at {id(value):#x}>"


def config_key(config: SemTokenConfig) -> str:
    """A stable key for ``config``: equal settings give equal keys."""
    return json.dumps(config.model_dump(mode="python"), sort_keys=True, default=_default)


def shared_engine(config: SemTokenConfig | None = None) -> SemToken:
    """The process-wide engine for ``config`` (default settings when ``None``), built on first use."""
    config = config if config is not None else SemTokenConfig()
    if not isinstance(config, SemTokenConfig):
        raise TypeError(f"config must be a SemTokenConfig or None, got {type(config).__name__}")
    global _warned_evicting
    key = config_key(config)
    evicted, first = [], False
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is not None and not engine.closed:
            _ENGINES.move_to_end(key)
        else:  # (one closed by its user: a new one, with micro-batching)
            from .engine import EncoderParts, SemToken, encoder_settings  # torch loads here, not on import

            parts_key = json.dumps(encoder_settings(config), sort_keys=True, default=_default)
            parts = _PARTS.get(parts_key)
            if parts is None:
                parts = _PARTS[parts_key] = EncoderParts.build(config)
            engine = _ENGINES[key] = SemToken(config, parts=parts)
            _ENGINES.move_to_end(key)
            while len(_ENGINES) > _MAX_ENGINES:
                evicted.append(_ENGINES.popitem(last=False)[1])
            if evicted and not _warned_evicting:
                first = _warned_evicting = True
    if first:
        logger.warning("semtoken-rag's registry holds %d engines, one per distinct setting, each with its own "
                       "memos, and now lets the least recently used go: a setting that is new at each request "
                       "(a tokenizer made per request, such as a lambda or functools.partial) makes a new "
                       "engine each time. Pass the same tokenizer object, a tokenizer name, or engine=.",
                       _MAX_ENGINES)
    for old in evicted:
        old.close()
    return engine


def registered_engines() -> list[SemToken]:
    """The engines the registry holds (for diagnostics and tests)."""
    with _LOCK:
        return list(_ENGINES.values())


def clear_registry() -> None:
    """Forget every shared engine, closing it (:meth:`SemToken.close`: components that still hold one keep
    working, encoding on their own); the next :func:`shared_engine` call builds a new one."""
    with _LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
        _PARTS.clear()
    for engine in engines:
        engine.close()
