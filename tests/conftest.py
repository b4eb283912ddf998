"""Shared fixtures.

Two tiers. The unit tier runs on a tiny random-weight BERT with a WordPiece tokenizer built here (no
download, seconds). The integration tier uses the real packaged MiniLM encoder: every test that uses an
``engine`` fixture is marked ``slow`` here, and modules that build real engines themselves mark
themselves. ``pytest -m "not slow"`` runs the unit tier only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import string
import subprocess
from pathlib import Path

import pytest

from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag.testing import LocalRedis, redis_server_binary

TINY_WORDS = ("the", "a", "an", "of", "in", "to", "and", "is", "was", "for", "on", "by", "with", "as",
              "at", "from", "it", "that", "this", "are", "be", "not", "who", "what", "when", "where",
              "first", "prize", "nobel", "physics", "award", "awarded", "river", "city", "war", "year",
              "banana", "fruit")


def pytest_collection_modifyitems(config, items):
    """Tests that use the real encoder through an ``engine`` fixture belong to the slow tier."""
    for item in items:
        if "engine" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def build_tiny_encoder(folder: Path) -> Path:
    """Save a random-weight 2-layer BERT (hidden size 32, fixed seed) and a fast WordPiece tokenizer.

    The vocabulary: specials, letters, digits and punctuation (with ``##`` continuations) and a few
    common words, so that any text tokenizes to known pieces or ``[UNK]``.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = list(dict.fromkeys(specials + pieces + ["##" + c for c in pieces] + list(TINY_WORDS)))
    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True,
                                                handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    try:
        model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128,
                                     vocab_size=len(vocab)))
    finally:
        torch.random.set_rng_state(generator_state)
    fast.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """Folder of the tiny random-weight BERT (built once per session)."""
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_engine(tiny_encoder) -> SemToken:
    """An engine on the tiny encoder with 32-token windows, so that long chunks span several windows."""
    return SemToken(SemTokenConfig(encoder=str(tiny_encoder), device="cpu", max_length=32, window_overlap=8))


@pytest.fixture(scope="session")
def engine() -> SemToken:
    return SemToken(SemTokenConfig(device="cpu"))


NOBEL = [
    ("List of Nobel laureates in Physics\nThe first Nobel Prize in Physics was awarded in 1901 to Wilhelm "
     "Conrad Röntgen, of Germany, who received 150,782 SEK. John Bardeen is the only laureate to win the "
     "prize twice, in 1956 and 1972. Maria Skłodowska-Curie also won two Nobel Prizes, for physics in 1903 "
     "and chemistry in 1911."),
    ("Nobel Prize\nThe Nobel Prizes are five separate prizes that, according to Alfred Nobel's will of 1895, "
     "are awarded to those who, during the preceding year, have conferred the greatest benefit to humankind. "
     "The prizes are awarded in Stockholm, Sweden, except for the peace prize, which is awarded in Oslo."),
    ("Banana\nA banana is an elongated, edible fruit produced by several kinds of large herbaceous flowering "
     "plants in the genus Musa. In some countries, bananas used for cooking may be called plantains. The "
     "fruit is variable in size, color, and firmness, but is usually elongated and curved."),
    ("Physics\nPhysics is the natural science that studies matter, its fundamental constituents, its motion "
     "and behavior through space and time, and the related entities of energy and force. Physics is one of "
     "the most fundamental scientific disciplines."),
]


@pytest.fixture()
def nobel() -> list[str]:
    return list(NOBEL)


@contextlib.contextmanager
def read_only_dir(root: Path):
    """Make ``root`` (and its sub-folders) unwritable for this process: by permissions for an ordinary
    user, by a read-only bind mount for root (which ignores permissions); skips when neither works."""
    if os.geteuid() != 0:
        dirs = [root, *[p for p in root.rglob("*") if p.is_dir()]]
        for d in dirs:
            d.chmod(0o500)
        try:
            yield
        finally:
            for d in dirs:
                d.chmod(0o700)
        return
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("root ignores directory permissions and there is no mount command")
    target = str(root)
    bound = subprocess.run([mount, "--bind", target, target], capture_output=True, check=False)
    if bound.returncode != 0:
        pytest.skip(f"root ignores directory permissions and a bind mount failed: {bound.stderr!r}")
    try:
        ro = subprocess.run([mount, "-o", "remount,ro,bind", target], capture_output=True, check=False)
        if ro.returncode != 0:
            pytest.skip(f"cannot remount {target} read-only: {ro.stderr!r}")
        yield
    finally:
        subprocess.run(["umount", target], capture_output=True, check=False)


# -- real servers: Redis (Debian's redis-server, installed by scripts/setup.sh) and a local Ray cluster
def _need_redis() -> None:
    pytest.importorskip("redis", reason="the redis client is not installed: pip install 'semtoken-rag[redis]'")
    if redis_server_binary() is None:
        pytest.skip("redis-server binary not found: scripts/setup.sh installs it (apt-get install redis-server)")


@pytest.fixture(scope="session")
def redis_server():
    """One redis-server for the session on a free 127.0.0.1 port (nothing persisted), stopped at the end."""
    _need_redis()
    with LocalRedis() as server:
        yield server


@pytest.fixture()
def redis_url(redis_server) -> str:
    """The session server's URL, its database flushed before the test."""
    with redis_server.client() as client:
        client.flushall()
    return redis_server.url


@pytest.fixture()
def redis_restartable():
    """A redis-server of the test's own, which the test may stop (kill), start and restart."""
    _need_redis()
    with LocalRedis() as server:
        yield server


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster sized for this 2-core machine (no dashboard, no usage stats), shut down after."""
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'semtoken-rag[ray]'")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # never reports anything off the machine
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20,
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def array_eq_tokenizer() -> type:
    """A word-count tokenizer class whose ``==`` answers an array, as numpy-backed objects do (code that
    compares settings must not call it)."""
    import numpy as np

    class Words:
        def __init__(self) -> None:
            self.arr = np.arange(3)

        def __call__(self, text: str) -> int:
            return len(text.split())

        def __eq__(self, other: object):  # (an array, not a bool)
            return self.arr == getattr(other, "arr", None)

        __hash__ = object.__hash__

    return Words


def assert_engine_follows_settings(component: type, bad_rate: float) -> None:
    """An integration's component (``component(device=, tokenizer=)``): a copy with another tokenizer,
    or one assigned later, gets the engine of its own settings; assignments are validated."""
    first = component(device="cpu", tokenizer="cl100k_base")
    assert first.get_engine().config.tokenizer == "cl100k_base"
    other = first.model_copy(update={"tokenizer": "o200k_base"})
    assert other.get_engine().config.tokenizer == "o200k_base"
    assert first.get_engine().config.tokenizer == "cl100k_base"
    first.tokenizer = "o200k_base"
    assert first.get_engine() is other.get_engine()
    with pytest.raises(ValueError, match="rate"):
        first.rate = bad_rate
