"""Pre-warm a fingerprint store from a corpus file, in-process or on a Ray cluster (``semtoken-rag prewarm``).

:func:`read_texts` streams the chunk texts of a JSON Lines (``.jsonl``, ``.jsonl.gz``) or Parquet file.
:func:`prewarm_corpus` fingerprints them into ``config.store`` (Redis or a directory): in-process in
large batches, or with ``ray_address`` on Ray Data, ``map_batches`` over a pool of actors (one GPU per
actor where the cluster has GPUs). Chunks already stored are skipped (one multi-key existence check
per batch), so a stopped run resumes where it was. The texts must be exactly the chunks the retriever
will return: the content only, no metadata.

A face of the engine: it imports the engine; Ray and pyarrow are imported only when used.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import SemTokenConfig, carried_config

logger = logging.getLogger(__name__)

_READ_BATCH = 4096  # texts per in-process batch (the engine encodes them in its own batches)


class CorpusError(ValueError):
    """The corpus cannot be pre-warmed as given (format, a missing field, a bad record, no shared
    store for Ray): a user error, which the command reports in one line."""


@dataclass(frozen=True)
class PrewarmReport:
    """What a pre-warm run did: ``passages`` read, ``encoded`` (the rest were stored already or blank),
    ``store_errors``: faults of the store while it ran (each a write or a lookup that may be missing),
    ``analysed``: stored entries that lacked the current analysis and got it (no encoding), ``pruned``:
    entries a directory store deleted while it ran to stay within its bound (``cache_max_disk_bytes``; the
    corpus's, or older ones), ``missing``: when it pruned, how many of the corpus's chunks the store lacks at
    the end (``None``: not checked, on Ray)."""

    passages: int
    encoded: int
    seconds: float
    ray: bool
    store_errors: int = 0
    analysed: int = 0
    pruned: int = 0
    missing: int | None = None

    @property
    def skipped(self) -> int:
        return self.passages - self.encoded

    @property
    def passages_per_second(self) -> float:
        return self.passages / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skipped": self.skipped, "passages_per_second": self.passages_per_second}


def _format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".json", ".json.gz")):
        return "jsonl"
    if name.endswith((".parquet", ".pq")) or path.is_dir():
        return "parquet"
    raise CorpusError(f"corpus {str(path)!r}: expected .jsonl, .jsonl.gz or .parquet (or a folder of parquet)")


def _text(record: Any, field: str, where: str) -> str:
    """The chunk text of one record; bad records are data errors (ValueError naming the line)."""
    value = record.get(field) if isinstance(record, dict) else None
    if isinstance(value, str):
        return value
    if not isinstance(record, dict):
        problem = f"expected a JSON object, got {type(record).__name__}"
    elif field not in record:
        problem = f"no field {field!r} (fields: {', '.join(sorted(record)) or 'none'}); choose it with --text-field"
    else:
        problem = f"field {field!r} must be a string, got {type(value).__name__}"
    raise CorpusError(f"{where}: {problem}")


def read_texts(path: str | os.PathLike[str], text_field: str = "text") -> Iterator[str]:
    """The ``text_field`` of every record of a JSON Lines or Parquet corpus, in file order.

    A record without the field, or with a non-string value, raises ``ValueError`` naming the line.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.jsonl"
    >>> _ = p.write_text('{"text": "a chunk"}\\n\\n{"text": "another", "id": 2}\\n')
    >>> list(read_texts(p))
    ['a chunk', 'another']
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus {str(path)!r} does not exist")
    if _format(path) == "jsonl":
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        n = 0
        try:
            with opener(path, "rt", encoding="utf-8-sig") as f:  # (a byte order mark at the start is skipped)
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise CorpusError(f"{path}:{n}: not JSON ({e.msg})") from None
                        yield _text(record, text_field, f"{path}:{n}")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{path}: not UTF-8 text ({e.reason}) at or after line {n + 1}") from None
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # (not OSErrors but BadGzipFile: a damaged .gz)
            raise CorpusError(f"{path}: not a readable gzip file ({e}) at or after line {n + 1}") from None
        return
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading parquet needs pyarrow: pip install 'semtoken-rag[ray]' (or pyarrow)") from e
    import pyarrow as pa

    try:
        dataset = pq.ParquetDataset(path)
        names = dataset.schema.names
    except pa.ArrowException as e:
        raise CorpusError(f"{path}: not a readable Parquet file or folder ({e})") from None
    if text_field not in names:
        raise CorpusError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); "
                         "choose it with --text-field")
    for piece in dataset.fragments:
        try:  # (batch by batch: a fragment is never read whole)
            for batch in piece.to_batches(columns=[text_field]):
                for value in batch.column(0).to_pylist():
                    yield _text({text_field: value}, text_field, f"{path}: column {text_field!r}")
        except pa.ArrowException as e:
            raise CorpusError(f"{piece.path}: not a readable Parquet file ({e})") from None


def _check_store(config: SemTokenConfig, ray: bool) -> None:
    if config.store is None and config.cache_dir is None:
        if ray:
            raise CorpusError("pre-warming on Ray needs a shared store: set store='redis://host:port/db' "
                             "(or a directory every worker sees)")
        logger.warning("no store configured: fingerprints are kept in this process's memory only")


def prewarm_corpus(path: str | os.PathLike[str], config: SemTokenConfig, *, text_field: str = "text",
                   ray_address: str | None = None, use_ray: bool = False, actors: int | None = None,
                   batch_size: int = 256, progress: Callable[[int], None] | None = None) -> PrewarmReport:
    """Fingerprint every chunk of the corpus at ``path`` into ``config.store``.

    Args:
        path: a ``.jsonl``/``.jsonl.gz`` file (one JSON object per line) or a ``.parquet`` file/folder.
        config: the engine configuration of the replicas that will read the store (same encoder
            and window settings, else the keys differ).
        text_field: the field (column) holding the chunk text.
        use_ray, ray_address: run on Ray Data; ``ray_address`` None starts (or joins) a local cluster,
            "auto" joins a running one, ``ray://host:10001`` a remote one.
        actors: Ray actors (default: one per GPU, else one per 2 CPUs of the cluster).
        batch_size: texts per ``map_batches`` batch (Ray) or per encoder group (in-process).
        progress: called with the number of passages done since the previous call.
    """
    _check_store(config, use_ray)
    started = time.perf_counter()
    if use_ray:
        from .encoder import resolve_model_path

        resolve_model_path(config.encoder)  # here, not in every actor: a bad encoder is one clear ValueError
        counts = _on_ray(path, config, text_field, ray_address, actors, batch_size, progress)
    else:
        counts = _in_process(path, config, text_field, batch_size, progress)
    report = PrewarmReport(*counts[:2], time.perf_counter() - started, use_ray, *counts[2:])
    if report.pruned:
        logger.warning("the store's size bound (cache_max_disk_bytes=%s) deleted %d entries during the pre-warm%s",
                       config.cache_max_disk_bytes, report.pruned, "" if report.missing == 0 else
                       ": the corpus may not fit in it; raise it (None: unbounded), and as much for the replicas "
                       "that share the directory")
    logger.info("pre-warmed %d passages (%d encoded, %d already stored, %d of those given their analysis, %d "
                "store faults) in %.1f s", report.passages, report.encoded, report.skipped, report.analysed,
                report.store_errors, report.seconds)
    return report


def _pruned(engine: Any) -> int:
    """Entries the engine's directory store has deleted to stay within its bound (after its pruning ends)."""
    wait = getattr(engine.cache.backend, "wait_for_prune", None)
    if callable(wait):
        wait()
    return engine.cache_stats().disk_pruned


def _in_process(path, config, text_field, batch_size, progress) -> tuple[int, int, int, int, int, int | None]:
    from .registry import shared_engine

    engine = shared_engine(config)
    errors_before, pruned_before = engine.cache_stats().store_errors, _pruned(engine)
    passages = encoded = analysed = 0
    for batch in _batches(path, text_field):
        new, added = engine._prewarm(batch, batch_size)
        passages, encoded, analysed = passages + len(batch), encoded + new, analysed + added
        if progress is not None:
            progress(len(batch))
    pruned = _pruned(engine) - pruned_before
    return (passages, encoded, engine.cache_stats().store_errors - errors_before, analysed, pruned,
            _missing(engine, path, text_field) if pruned else None)


def _missing(engine: Any, path, text_field: str) -> int:
    """How many distinct non-blank chunks of the corpus the engine's store lacks (read again, checked by
    the batch as a pre-warm checks them): what its bound deleted of this corpus, not of older entries."""
    from .keys import cache_key

    missing = 0
    for batch in _batches(path, text_field):
        keys = list(dict.fromkeys(cache_key(t, engine.encoder.identity) for t in batch if t.strip()))
        missing += sum(not found for found in engine.cache.contains_many(keys))
    return missing


def _batches(path, text_field: str) -> Iterator[list[str]]:
    """The corpus's texts (:func:`read_texts`) in lists of at most ``_READ_BATCH``."""
    batch: list[str] = []
    for text in read_texts(path, text_field):
        batch.append(text)
        if len(batch) >= _READ_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


class _Actor:
    """A Ray Data actor: one engine (encoder loaded once) filling the shared store."""

    def __init__(self, config_json: str, text_field: str, batch_size: int, threads: int, source: str = "") -> None:
        import torch

        from .engine import SemToken

        if threads > 0:
            torch.set_num_threads(threads)
        self.engine = SemToken(SemTokenConfig.model_validate_json(config_json))
        self.field, self.batch_size, self.source = text_field, batch_size, source

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        texts = list(batch[self.field])
        for value in texts:  # (Ray reads a null or a missing field as None, a number column as numbers; the
            # error goes back as data: raised here, it would reach the driver as Ray's traceback text)
            if not isinstance(value, str):
                problem = (f"{self.source}: field {self.field!r} must be a string, got "
                           f"{'null or missing' if value is None else type(value).__name__}")
                return {"passages": [0], "encoded": [0], "analysed": [0], "store_errors": [0], "pruned": [0],
                        "error": [problem]}
        before, pruned = self.engine.cache_stats().store_errors, _pruned(self.engine)
        encoded, analysed = self.engine._prewarm(texts, self.batch_size)
        return {"passages": [len(texts)], "encoded": [encoded], "analysed": [analysed],
                "store_errors": [self.engine.cache_stats().store_errors - before],
                "pruned": [_pruned(self.engine) - pruned], "error": [""]}


def _on_ray(path, config, text_field, address, actors, batch_size, progress) -> tuple[int, int, int, int, int]:
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ImportError("--ray needs Ray Data: pip install 'semtoken-rag[ray]'") from e
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus {str(path)!r} does not exist")
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a local cluster reports nothing outside
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    n_actors = actors or (gpus if gpus else max(1, cpus // 2))
    # CPU actors share all CPUs but one, which stays free for the read tasks (else they starve)
    actor_cpus = 1.0 if gpus else max(0.25, (cpus - 1) / n_actors if cpus > 1 else 0.5)
    threads = 0 if gpus else max(1, round(cpus / n_actors))
    # read by the cluster's workers: the file must be on a filesystem they see (local cluster, NFS...)
    if _format(path) == "jsonl":
        ds = ray.data.read_json(str(path)).select_columns([text_field])
    else:
        ds = ray.data.read_parquet(str(path), columns=[text_field])
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts passages
    # GPU actors when there are GPUs; config travels as JSON (device resolved in each actor)
    # (a budget tokenizer that JSON cannot carry is left out, and with it the analyses: carried_config)
    config_json = carried_config(config.model_copy(update={"device": None if gpus else "cpu"}),
                                 lambda tokenizer: isinstance(tokenizer, str)).model_dump_json()
    out = ds.map_batches(
        _Actor, fn_constructor_kwargs={"config_json": config_json, "text_field": text_field,
                                       "batch_size": batch_size, "threads": threads, "source": str(path)},
        batch_size=batch_size, concurrency=n_actors, num_gpus=1 if gpus else 0,
        num_cpus=actor_cpus, batch_format="numpy")
    passages = encoded = errors = analysed = pruned = 0
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        bad = [str(e) for e in batch["error"] if e]
        if bad:
            raise CorpusError(bad[0])
        done = int(batch["passages"].sum())
        passages, encoded = passages + done, encoded + int(batch["encoded"].sum())
        errors, analysed = errors + int(batch["store_errors"].sum()), analysed + int(batch["analysed"].sum())
        pruned += int(batch["pruned"].sum())
        if progress is not None:
            progress(done)
    return passages, encoded, errors, analysed, pruned
