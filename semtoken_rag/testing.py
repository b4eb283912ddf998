"""A throwaway local ``redis-server`` for tests and benchmarks (loopback only, nothing persisted).

:class:`LocalRedis` starts the Debian ``redis-server`` binary (``scripts/setup.sh`` installs it) on a
free port of 127.0.0.1 with ``--save '' --appendonly no`` in a temporary directory, waits until it
answers ``PING`` and can be killed and restarted on the same port (to test outages). It needs the
``redis`` client package only for :meth:`LocalRedis.client`.

>>> from semtoken_rag.testing import redis_server_binary
>>> redis_server_binary() is None or redis_server_binary().endswith("redis-server")
True
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any

from typing_extensions import Self  # a dependency of pydantic

__all__ = ["LocalRedis", "free_port", "redis_server_binary"]


def redis_server_binary() -> str | None:
    """Path of the ``redis-server`` binary (``$SEMTOKEN_REDIS_SERVER``, else ``PATH``), or ``None``."""
    configured = os.environ.get("SEMTOKEN_REDIS_SERVER")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int, timeout: float) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class LocalRedis:
    """A ``redis-server`` child process on ``127.0.0.1:port``; use as a context manager.

    ``stop()`` kills it (SIGKILL: an outage, not a clean shutdown), ``start()`` starts it again on the
    same port with an empty dataset, ``restart()`` does both. ``extra_args`` go to the server's
    command line (e.g. ``["--maxmemory", "2mb"]``).
    """

    def __init__(self, port: int | None = None, *, binary: str | None = None,
                 extra_args: list[str] | None = None, start_timeout: float = 10.0) -> None:
        self.binary = binary or redis_server_binary()
        if self.binary is None:
            raise FileNotFoundError("redis-server not found: install it with 'apt-get install redis-server' "
                                    "(scripts/setup.sh does) or set SEMTOKEN_REDIS_SERVER")
        self.port = port or free_port()
        self.extra_args = list(extra_args or [])
        self.start_timeout = start_timeout
        self._dir = tempfile.mkdtemp(prefix="semtoken-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the server (no-op when running) and wait until it answers PING."""
        if self.running:
            return self
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", self._dir, "--daemonize", "no", "--protected-mode", "yes",
               "--logfile", os.path.join(self._dir, "redis.log"), *self.extra_args]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with status {self._proc.returncode} on port "
                                   f"{self.port}; see {self._dir}/redis.log")
            if _ping(self.port, 0.2):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on 127.0.0.1:{self.port} within "
                           f"{self.start_timeout} s")

    def stop(self) -> None:
        """Kill the server (SIGKILL) and wait for it; no-op when it is not running."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def restart(self) -> Self:
        """Kill and start again on the same port (the data is gone: nothing is persisted)."""
        self.stop()
        return self.start()

    def client(self, **kwargs: Any) -> Any:
        """A ``redis.Redis`` client for this server (needs the ``redis`` package)."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalRedis(port={self.port}, running={self.running})"
