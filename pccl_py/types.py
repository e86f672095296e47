"""Small value types shared by the layers: reduction operators, quantization settings,
op results, and what a peer tells the master about its shared state (the sync
strategy and one entry's description)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from pccl_py import _native


class ReduceOp(enum.Enum):
    SUM = "sum"
    AVG = "avg"
    PROD = "prod"
    MIN = "min"
    MAX = "max"

    @property
    def native(self) -> _native.ReduceOp:
        return _NATIVE_OPS[self]


_NATIVE_OPS = {
    ReduceOp.SUM: _native.ReduceOp.SUM,
    ReduceOp.AVG: _native.ReduceOp.AVG,
    ReduceOp.PROD: _native.ReduceOp.PROD,
    ReduceOp.MIN: _native.ReduceOp.MIN,
    ReduceOp.MAX: _native.ReduceOp.MAX,
}


@dataclass(frozen=True)
class ReduceInfo:
    """What a successful all-reduce did."""

    world_size: int  # peers that contributed
    tx_bytes: int
    rx_bytes: int
    epoch: int  # the epoch it succeeded in
    attempts: int  # 1 unless it was retried over the survivors
    contributors: tuple[int, ...] = ()  # peer ids whose input is in the result, ring order
    algorithm: str = "ring"  # how the bytes moved: "ring", "direct" or "quantized"


@dataclass(frozen=True)
class GatherInfo:
    """What a successful all_gather, reduce_scatter or broadcast did."""

    world_size: int  # peers that took part
    tx_bytes: int
    rx_bytes: int
    # The result: all_gather (world_size, *x.shape) in rank order; reduce_scatter this
    # peer's chunk; broadcast x itself. A numpy array, or a tensor when x is one.
    output: Any
    epoch: int  # the epoch it succeeded in
    rank: int  # this peer's rank then (its row of an all-gather, its chunk of a reduce-scatter)
    attempts: int  # 1 unless it was retried over the survivors
    contributors: tuple[int, ...] = ()  # peer ids in rank order


@dataclass(frozen=True)
class P2PInfo:
    """What a successful send or receive did."""

    peer: int  # the other peer (a receive from any peer: the sender)
    rank: int  # its rank in the ring of `epoch`
    nbytes: int
    tag: int
    epoch: int
    tx_bytes: int
    rx_bytes: int


_QUANT_KINDS = {"minmax": _native.QuantKind.MINMAX, "zeropoint": _native.QuantKind.ZEROPOINT}
_QUANT_DTYPES = {"uint8": _native.DataType.UINT8, "uint16": _native.DataType.UINT16}


@dataclass(frozen=True)
class Quantization:
    """How an all-reduce quantizes what it sends (docs/quantization.md).

    kind: "minmax" (block min and scale) or "zeropoint" (scale and a zero point, so 0 is
    exact); dtype: "uint8" or "uint16". Parameters are per block of 2048 elements and
    travel with the bytes; sums are accumulated in full precision (float, double for
    float64), and every peer ends with the same bytes. Only SUM and AVG of float16,
    bfloat16, float32 and float64 tensors can be quantized; every peer must pass the
    same Quantization (a mismatch fails the op on every peer with ProtocolError).
    """

    kind: str = "minmax"
    dtype: str = "uint8"

    def __post_init__(self) -> None:
        if self.kind not in _QUANT_KINDS:
            raise ValueError(f"Quantization kind must be one of {sorted(_QUANT_KINDS)}, not {self.kind!r}")
        if self.dtype not in _QUANT_DTYPES:
            raise ValueError(f"Quantization dtype must be one of {sorted(_QUANT_DTYPES)}, not {self.dtype!r}")

    @property
    def native_kind(self) -> _native.QuantKind:
        return _QUANT_KINDS[self.kind]

    @property
    def native_dtype(self) -> _native.DataType:
        return _QUANT_DTYPES[self.dtype]

    @classmethod
    def parse(cls, text: str) -> Quantization:
        """'uint8' -> minmax uint8; 'zeropoint:uint16' or 'zeropoint-uint16' -> that."""
        parts = text.replace("-", ":").split(":")
        if len(parts) == 1:
            return cls(dtype=parts[0]) if parts[0] in _QUANT_DTYPES else cls(kind=parts[0])
        if len(parts) == 2:
            return cls(kind=parts[0], dtype=parts[1])
        raise ValueError(f"bad quantization {text!r}: expected KIND:DTYPE, e.g. minmax:uint8")


class SyncStrategy(enum.Enum):
    ENFORCE_POPULAR = "enforce_popular"  # the most popular content wins (default)
    SEND_ONLY = "send_only"  # my content is authoritative: I never receive
    RECEIVE_ONLY = "receive_only"  # I expect to receive (a joiner); I never vote


@dataclass(frozen=True)
class EntryMeta:
    """One shared-state entry as the master sees it: layout and content hash."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    hash: int


@dataclass(frozen=True)
class Compression:
    """How DiLoCo compresses its outer step (pccl_py.optim, docs/diloco.md): instead of
    all-reducing the dense pseudo-gradient, each peer sends `topk` entries of every
    `chunk` consecutive ones (indices and values) of its error-feedback buffer, and the
    peers all-gather these payloads and add them up in rank order (SparseLoCo).

    topk: entries sent per chunk (the same on every peer, so every payload has the
    same size); chunk: elements per chunk (the index of an entry takes
    ceil(log2(chunk)) bits); bits: 2, 4 or 8 (sign and magnitude, the magnitude spread
    evenly between the chunk's smallest and largest selected one) or None (float32
    values); transform: None, or "dct" (an orthonormal DCT-II over blocks of
    `dct_block` elements before the selection, DeMo-style); beta: the error-feedback
    decay, e = beta * e + pseudo_gradient (SparseLoCo: 0.95); keep_residual: restart each peer's local
    model from the global parameters minus its own error feedback (its progress not
    sent yet) instead of from the global parameters (SPARTA-like: what is not averaged
    stays local; the shared state is unchanged); average: "senders" (each entry of
    the sum divided by the number of peers that sent it, so an entry only one peer
    picked moves the global parameters by that peer's full value; the default,
    measured best on the tiny LM, docs/diloco.md) or "peers" (every entry divided by
    the summed weights, as SparseLoCo). Every peer must pass the same Compression.
    """

    topk: int = 40
    chunk: int = 4096
    bits: int | None = 2
    transform: str | None = None
    beta: float = 0.95
    dct_block: int = 64
    keep_residual: bool = False
    average: str = "senders"

    def __post_init__(self) -> None:
        if self.chunk < 2 or self.chunk > 1 << 24:
            raise ValueError(f"Compression chunk must be in [2, 2**24], not {self.chunk}")
        if not 1 <= self.topk <= self.chunk:
            raise ValueError(f"Compression topk must be in [1, chunk={self.chunk}], not {self.topk}")
        if self.bits not in (2, 4, 8, None):
            raise ValueError(f"Compression bits must be 2, 4, 8 or None, not {self.bits!r}")
        if self.transform not in (None, "dct"):
            raise ValueError(f"Compression transform must be None or 'dct', not {self.transform!r}")
        if self.transform == "dct" and (self.dct_block < 2 or self.chunk % self.dct_block):
            raise ValueError(f"Compression dct_block must be >= 2 and divide chunk={self.chunk}")
        if self.average not in ("peers", "senders"):
            raise ValueError(f"Compression average must be 'peers' or 'senders', not {self.average!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"Compression beta must be in [0, 1], not {self.beta}")
