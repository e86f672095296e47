"""The payload codec of DiLoCo's compressed outer step (pccl_py.Compression): chunked
top-k of an error-feedback buffer, low-bit values, an optional block DCT; and the
decoder that adds every peer's payload up in rank order.

A payload is a uint8 vector whose size depends only on (numel, Compression), so every
peer's has the same size (fixed k per chunk) and the peers can all-gather them:

    weight   float32             1: a pseudo-gradient; 0: a peer with none (a joiner)
    lo, hi   float32 x chunks    (bits set) smallest and largest |value| sent per chunk
    indices  ceil(log2 chunk) bits x topk x chunks, packed little-endian
    values   bits x topk x chunks (a sign bit, then the magnitude's level between lo
             and hi), or float32 x topk x chunks when bits is None

Bit-identical sums: decode_sum() runs on every peer over the same rows and uses only
elementwise float32 operations in a fixed order (rows added in rank order, each row's
indices are distinct; the inverse DCT adds its basis rows one at a time instead of a
matmul, whose summation order may differ between BLAS kernels), so every peer ends
with the same bytes. The forward transform and top-k run on one peer only.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pccl_py import Compression

_F32 = 4


def dct_basis(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix (rows: frequencies), float32, computed in float64."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    basis = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    basis[0] /= math.sqrt(2.0)
    return basis.to(torch.float32)


def pack_bits(values: np.ndarray, width: int) -> np.ndarray:
    """Packs unsigned integers < 2**width into ceil(len*width/8) bytes, little-endian."""
    bits = (values.astype(np.uint32)[:, None] >> np.arange(width, dtype=np.uint32)) & 1
    return np.packbits(bits.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_bits(buf: np.ndarray, count: int, width: int) -> np.ndarray:
    """Inverse of pack_bits: `count` integers of `width` bits (int64)."""
    bits = np.unpackbits(buf, count=count * width, bitorder="little").reshape(count, width)
    return bits.astype(np.int64) @ (np.int64(1) << np.arange(width, dtype=np.int64))


def _packed_size(count: int, width: int) -> int:
    return (count * width + 7) // 8


class Codec:
    """Encodes a flat float32 vector of `numel` elements into a payload and adds
    payloads up. Stateless apart from its layout: the error-feedback buffer belongs to
    the caller (pccl_py.optim.diloco)."""

    def __init__(self, numel: int, compression: Compression) -> None:
        self.numel = numel
        self.compression = c = compression
        self.chunks = max(1, -(-numel // c.chunk))
        self.padded = self.chunks * c.chunk
        self.count = self.chunks * c.topk  # entries sent
        self.index_bits = max(1, (c.chunk - 1).bit_length())
        self._value_bits = c.bits if c.bits is not None else 32
        scales = 2 * _F32 * self.chunks if c.bits is not None else 0
        self._offsets = np.cumsum(
            [0, _F32, scales, _packed_size(self.count, self.index_bits), _packed_size(self.count, self._value_bits)]
        )
        self.payload_bytes = int(self._offsets[-1])
        self._basis = dct_basis(c.dct_block) if c.transform == "dct" else None

    # ------------------------------------------------------------------ encode

    def encode(self, x: torch.Tensor, weight: float = 1.0) -> tuple[np.ndarray, torch.Tensor]:
        """Returns the payload of flat float32 `x` and the dense vector that decoding
        it gives (what this peer sends, in x's domain: subtract it from the error
        feedback)."""
        c = self.compression
        coeffs = torch.zeros(self.padded, dtype=torch.float32)
        coeffs[: self.numel] = x.reshape(-1)
        coeffs = self._forward(coeffs).view(self.chunks, c.chunk)
        idx = torch.topk(coeffs.abs(), c.topk, dim=1, sorted=False).indices
        idx, _ = torch.sort(idx, dim=1)  # a canonical order: payloads depend on the values only
        vals = coeffs.gather(1, idx)
        out = np.zeros(self.payload_bytes, np.uint8)
        o = self._offsets
        out[o[0] : o[1]] = np.frombuffer(np.float32(weight).tobytes(), np.uint8)
        out[o[2] : o[3]] = pack_bits(idx.reshape(-1).numpy(), self.index_bits)
        if c.bits is None:
            out[o[3] : o[4]] = vals.reshape(-1).numpy().view(np.uint8)
        else:
            mag = vals.abs()
            lo, hi = mag.min(dim=1, keepdim=True).values, mag.max(dim=1, keepdim=True).values
            levels = (1 << (c.bits - 1)) - 1
            step = (hi - lo) / levels
            safe = torch.where(step > 0, step, torch.ones_like(step))
            level = torch.clamp(torch.round((mag - lo) / safe), 0, levels).to(torch.int64)
            level = torch.where(step > 0, level, torch.zeros_like(level))
            codes = (vals < 0).to(torch.int64) << (c.bits - 1) | level
            scales = torch.cat([lo, hi], dim=1).contiguous()
            out[o[1] : o[2]] = scales.reshape(-1).numpy().view(np.uint8)
            out[o[3] : o[4]] = pack_bits(codes.reshape(-1).numpy(), c.bits)
        sent = self.decode_sum(out[None, :])[0]
        return out, sent

    # ------------------------------------------------------------------ decode

    def decode_sum(self, rows: np.ndarray, over_senders: bool = False) -> tuple[torch.Tensor, float]:
        """The sum of the payloads in `rows` (shape (world, payload_bytes), rank
        order), dense, and the sum of their weights. Bit-identical on every peer.
        over_senders: each entry (in the transformed domain) divided by the number of
        rows with a nonzero weight that sent it, and the weight returned as 1 (0 if
        every row's weight is 0): Compression.average == "senders"."""
        if rows.ndim != 2 or rows.shape[1] != self.payload_bytes:
            raise ValueError(f"expected rows of {self.payload_bytes} bytes, got shape {rows.shape}")
        c = self.compression
        total = torch.zeros(self.padded, dtype=torch.float32)
        weight = np.float32(0.0)
        senders = torch.zeros(self.padded, dtype=torch.float32) if over_senders else None
        base = torch.arange(self.chunks, dtype=torch.int64)[:, None] * c.chunk
        o = self._offsets
        for row in rows:
            row_weight = row[o[0] : o[1]].view(np.float32)[0]
            weight = np.float32(weight + row_weight)
            idx = torch.from_numpy(unpack_bits(row[o[2] : o[3]], self.count, self.index_bits))
            idx = idx.view(self.chunks, c.topk)
            if c.bits is None:
                vals = torch.from_numpy(row[o[3] : o[4]].view(np.float32).copy()).view(self.chunks, c.topk)
            else:
                scales = torch.from_numpy(row[o[1] : o[2]].view(np.float32).copy()).view(self.chunks, 2)
                lo, hi = scales[:, :1], scales[:, 1:]
                codes = torch.from_numpy(unpack_bits(row[o[3] : o[4]], self.count, c.bits)).view(self.chunks, c.topk)
                levels = (1 << (c.bits - 1)) - 1
                step = (hi - lo) / levels
                mag = lo + (codes & levels).to(torch.float32) * step
                vals = torch.where((codes >> (c.bits - 1)) > 0, -mag, mag)
            # Indices within a row are distinct: each element gets at most one add.
            total.index_add_(0, (idx + base).reshape(-1), vals.reshape(-1))
            if senders is not None and row_weight != 0:
                senders.index_add_(0, (idx + base).reshape(-1), torch.ones(self.count))
        if senders is not None:
            total = total / torch.clamp(senders, min=1.0)
            weight = np.float32(1.0 if weight else 0.0)
        return self._inverse(total)[: self.numel], float(weight)

    # ------------------------------------------------------------------ transform

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._basis is None:
            return x
        b = self._basis.shape[0]
        return (x.view(-1, b) @ self._basis.T).reshape(-1)

    def _inverse(self, coeffs: torch.Tensor) -> torch.Tensor:
        if self._basis is None:
            return coeffs
        b = self._basis.shape[0]
        blocks = coeffs.view(-1, b)
        out = torch.zeros_like(blocks)
        for k in range(b):  # elementwise, in a fixed order: the same bytes on every machine
            out.add_(blocks[:, k : k + 1] * self._basis[k])
        return out.reshape(-1)
