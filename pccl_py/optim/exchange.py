"""The compressed outer-step exchange (pccl_py.Compression): error feedback, encoding,
the all-gather of every peer's payload and the dense sum, for DiLoCo and AsyncDiLoCo.

SparseLoCo (arXiv 2508.15706), per peer and outer step, with pseudo-gradient d:

    e    = beta * e + d            error feedback, peer-local (never shared)
    sent = decode(encode(e))       top-k per chunk, low-bit values
    e    = e - sent
    sum  = sum over peers, in rank order, of decode(payload_r)   (every peer the same bytes)

The caller divides `sum` by the summed weights and hands it to the outer optimizer.
The error-feedback buffer is local state: it is not part of the shared state, a joiner
starts it at zeros, and a peer that restarts loses it (what it had not sent yet).
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import numpy as np
import torch

from pccl_py import Compression
from pccl_py.optim.codec import Codec


class CompressedExchange:
    """Owns the codec, the error-feedback buffer and (for the async path) one worker
    thread; close() stops the thread."""

    def __init__(self, comm: Any, numel: int, compression: Compression, timeout: float | None) -> None:
        self.comm = comm
        self.numel = numel
        self.compression = compression
        self.codec = Codec(numel, compression)
        self.timeout = timeout
        self.error = torch.zeros(numel, dtype=torch.float32)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def encode(self, flat: torch.Tensor) -> np.ndarray:
        """Folds the pseudo-gradient flat[:numel] into the error feedback and returns
        the payload to send; flat[numel] is the contribution weight (1, or 0 for a
        joiner with nothing to contribute, whose error feedback stays untouched)."""
        weight = float(flat[self.numel])
        if weight == 0.0:
            return np.zeros(self.codec.payload_bytes, np.uint8)
        beta = self.compression.beta
        self.error.mul_(beta).add_(flat[: self.numel])
        payload, sent = self.codec.encode(self.error, weight)
        self.error.sub_(sent)
        return payload

    def exchange(self, payload: np.ndarray, out: torch.Tensor) -> Any:
        """All-gathers the payloads (retried over the survivors), writes their dense
        sum into out[:numel] and the summed weight into out[numel]; returns the
        gather's info (world_size, tx_bytes: what an all-gather sends)."""
        info = self.comm.all_gather(payload, timeout=self.timeout, retry=True)
        rows = np.asarray(info.output).reshape(info.world_size, -1)
        total, weight = self.codec.decode_sum(rows, over_senders=self.compression.average == "senders")
        out[: self.numel] = total
        out[self.numel] = weight
        return info

    def run(self, flat: torch.Tensor) -> Any:
        """encode + exchange, in place in `flat`."""
        return self.exchange(self.encode(flat), flat)

    def start(self, flat: torch.Tensor) -> ExchangeHandle:
        """Encodes now, exchanges in the background; the handle's wait() fills `flat`."""
        payload = self.encode(flat)
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pccl-gather")
        return ExchangeHandle(self._pool.submit(self.exchange, payload, flat))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class ExchangeHandle:
    def __init__(self, future: concurrent.futures.Future[Any]) -> None:
        self._future = future

    def wait(self, timeout: float | None = None) -> Any:
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()
