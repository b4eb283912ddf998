"""Shared fixtures: one real engine (the packaged MiniLM encoder, on CPU) for the whole session."""

from __future__ import annotations

import os

import pytest

from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag.testing import LocalRedis, redis_server_binary


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
