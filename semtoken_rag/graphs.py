"""The encoder's forward pass replayed from CUDA graphs.

A small encoder's eager forward on a GPU is bound by the host launching its kernels, not by the GPU:
on an H100 one MiniLM pass over 20 passages (20 x 256 tokens) spent 4.1 ms launching and finished 0.05 ms
later; replayed from a CUDA graph the same pass took 1.2 ms with 0.03 ms on the host, and its hidden states
were bit-identical to the eager pass's (2026-11-23, ``benchmarks/cuda/experiments.py``).

Every batch on CUDA has one width (the encoder's window, see :attr:`Encoder.bucket`), so a graph is keyed
by its row count alone, rounded up to a power of two (at most the batch size), and by whether queries ride
in the rows (a per-token group id, turned into a 4D mask inside the graph). Rows are independent in the
model, so the spare rows (left holding an earlier batch's tokens) change nothing in the real ones. All
graphs share one memory pool; a lock serialises filling the static inputs, the replay and whatever the
caller does with the output (it is overwritten by the next replay). A graph is captured on first use; if
capturing fails the encoder logs once and stays eager.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")


def graph_rows(n: int, max_rows: int) -> int:
    """The row count of the graph that runs a batch of ``n`` rows: the next power of two, at most
    ``max_rows`` (a batch never holds more).

    >>> [graph_rows(n, 512) for n in (1, 2, 3, 20, 33, 512)], graph_rows(100, 100)
    ([1, 2, 4, 32, 64, 512], 100)
    """
    if not 1 <= n <= max_rows:
        raise ValueError(f"a batch of {n} rows does not fit graphs of at most {max_rows}")
    return min(1 << (n - 1).bit_length(), max_rows)


def group_mask(group: torch.Tensor) -> torch.Tensor:
    """The 4D boolean attention mask of rows whose tokens carry group ids (0: padding, 1: the row's own
    sequence, 2...: riding queries): each token sees its own group, padding sees the row's sequence.

    >>> group_mask(torch.tensor([[1, 1, 2, 0]]))[0, 0].int().tolist()
    [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0]]
    """
    looks = torch.where(group == 0, 1, group)
    return (looks[:, :, None] == group[:, None, :]).unsqueeze(1)


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: dict[str, torch.Tensor], output: torch.Tensor):
        self.graph, self.inputs, self.output = graph, inputs, output


class GraphedForward:
    """``model``'s last hidden states for batches of ``width`` tokens a row, replayed from CUDA graphs."""

    def __init__(self, model: torch.nn.Module, device: torch.device, width: int, max_rows: int,
                 pad_id: int) -> None:
        self.model, self.device, self.width, self.max_rows, self.pad_id = model, device, width, max_rows, pad_id
        self.enabled = True
        self.captured = 0
        self._graphs: dict[tuple[int, bool], _Graph] = {}
        self._pool = None
        self._lock = threading.Lock()

    def run(self, ids: torch.Tensor, group: torch.Tensor, positions: torch.Tensor | None,
            consume: Callable[[torch.Tensor], T]) -> T | None:
        """``consume(hidden)`` of the batch ``ids`` (``(n, width)``, on the CPU) whose tokens carry the
        group ids ``group`` (0 for padding, 1 for each row's sequence, 2... for riding queries, which
        need ``positions``). ``hidden`` is the ``(n, width, d)`` output, valid only inside ``consume``.
        ``None`` when graphs are off (capturing failed), so that the caller runs the eager pass."""
        n = len(ids)
        riders = positions is not None
        with self._lock, torch.cuda.device(self.device):  # (capture and replay on the model's GPU)
            if not self.enabled:
                return None
            graph = self._graphs.get((graph_rows(n, self.max_rows), riders))
            if graph is None:
                graph = self._capture(graph_rows(n, self.max_rows), riders)
                if graph is None:
                    return None
            inp = graph.inputs
            inp["ids"][:n].copy_(ids.pin_memory(), non_blocking=True)
            if riders:
                inp["group"][:n].copy_(group.pin_memory(), non_blocking=True)
                inp["positions"][:n].copy_(positions.pin_memory(), non_blocking=True)
            else:
                inp["mask"][:n].copy_((group != 0).long().pin_memory(), non_blocking=True)
            graph.graph.replay()
            return consume(graph.output[:n])

    def _capture(self, rows: int, riders: bool) -> _Graph | None:
        w, dev = self.width, self.device
        inputs = {"ids": torch.full((rows, w), self.pad_id, dtype=torch.long, device=dev)}
        if riders:
            inputs["group"] = torch.ones((rows, w), dtype=torch.long, device=dev)
            inputs["positions"] = torch.arange(w, device=dev).repeat(rows, 1)
        else:
            inputs["mask"] = torch.ones((rows, w), dtype=torch.long, device=dev)

        def forward() -> torch.Tensor:
            if riders:
                return self.model(input_ids=inputs["ids"], attention_mask=group_mask(inputs["group"]),
                                  position_ids=inputs["positions"]).last_hidden_state
            return self.model(input_ids=inputs["ids"], attention_mask=inputs["mask"]).last_hidden_state

        try:
            with torch.inference_mode():
                side = torch.cuda.Stream(dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):  # warm-up off the capture (lazy inits, autotuning)
                    for _ in range(2):
                        forward()
                torch.cuda.current_stream(dev).wait_stream(side)
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    output = forward()
        except Exception as e:  # noqa: BLE001 - any capture failure: stay eager, say so once
            self.enabled = False
            logger.warning("semtoken-rag: capturing a CUDA graph of the encoder failed (%s: %s); "
                           "the encoder runs eagerly", type(e).__name__, e)
            return None
        self.captured += 1
        logger.debug("semtoken-rag: captured a CUDA graph of the encoder, %d rows x %d tokens%s",
                     rows, w, " with riding queries" if riders else "")
        graph_entry = _Graph(graph, inputs, output)
        self._graphs[(rows, riders)] = graph_entry
        return graph_entry
