"""CUDA path (runs only where torch sees a GPU): the device kernels produce the CPU
kernels' bytes and decode to the CPU's values; the Communicator takes CUDA tensors
(staged through pinned host memory) for plain and quantized all-reduces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from threads import run_parallel

import pccl_py as pccl
from pccl_py import _native as nat
from pccl_py.testing import join_group

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")

KINDS = [nat.QuantKind.MINMAX, nat.QuantKind.ZEROPOINT]
WIRES = [nat.DataType.UINT8, nat.DataType.UINT16]
DTYPES = {
    torch.float16: nat.DataType.FLOAT16,
    torch.bfloat16: nat.DataType.BFLOAT16,
    torch.float32: nat.DataType.FLOAT32,
    torch.float64: nat.DataType.FLOAT64,
}


def host_view(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


@pytest.mark.skipif(not nat.CUDA_BUILT, reason="pccl_py was built without nvcc")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_device_kernels_match_the_cpu_bit_for_bit(kind, wire, dtype) -> None:
    count = 3 * 2048 + 123
    x = (torch.randn(count, dtype=torch.float64) * 3 + 1).to(dtype)
    nbytes = nat.quant_encoded_bytes(kind, wire, DTYPES[dtype], count)
    cpu_enc = np.empty(nbytes, np.uint8)
    nat.quantize(kind, wire, DTYPES[dtype], host_view(x), cpu_enc)
    xd = x.cuda()
    dev_enc = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    nat.cuda_quantize(kind, wire, DTYPES[dtype], xd.data_ptr(), count, dev_enc.data_ptr())
    assert np.array_equal(dev_enc.cpu().numpy(), cpu_enc), "GPU encoding differs from the CPU's"
    cpu_dec = torch.empty_like(x)
    nat.dequantize(kind, wire, DTYPES[dtype], cpu_enc, host_view(cpu_dec))  # a view: cpu_dec is on the host
    dev_dec = torch.empty_like(xd)
    nat.cuda_dequantize(kind, wire, DTYPES[dtype], dev_enc.data_ptr(), count, dev_dec.data_ptr())
    assert torch.equal(dev_dec.cpu().view(torch.uint8), cpu_dec.view(torch.uint8)), "GPU decoding differs"


@pytest.mark.parametrize("quantization", [None, pccl.Quantization("minmax", "uint8")])
def test_communicator_takes_cuda_tensors(master: pccl.Master, quantization) -> None:
    n = 2
    comms = [pccl.Communicator(master.address, name=f"g{i}") for i in range(n)]
    try:
        joined = run_parallel(
            [lambda c=c: join_group(c.connect(timeout=20), n, timeout=20) for c in comms], 40.0
        )
        assert not any(isinstance(r, BaseException) for r in joined), joined
        xs = [torch.randn(100_003, device="cuda") for _ in range(n)]
        exact = torch.stack([x.double() for x in xs]).sum(0)
        work = [x.clone() for x in xs]
        outs = [torch.empty_like(x) for x in xs]
        res = run_parallel(
            [lambda c=c, w=w: c.all_reduce(w, quantization=quantization) for c, w in zip(comms, work)], 40.0
        )
        assert all(isinstance(r, pccl.ReduceInfo) for r in res), res
        assert all(w.is_cuda for w in work)
        assert torch.equal(work[0], work[1])
        tol = 0.03 if quantization else 1e-5
        assert ((work[0].double() - exact).norm() / exact.norm()).item() < tol
        res = run_parallel(
            [
                lambda c=c, x=x, o=o: c.all_reduce(x, out=o, quantization=quantization)
                for c, x, o in zip(comms, xs, outs)
            ],
            40.0,
        )
        assert all(isinstance(r, pccl.ReduceInfo) for r in res), res
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], work[0])
    finally:
        for c in comms:
            c.close()


def test_shared_state_syncs_cuda_tensors(master: pccl.Master) -> None:
    """CUDA entries are hashed from their host mirrors and receive the elected bytes on
    the device; the sender's device tensors are untouched."""
    n = 2
    comms = [pccl.Communicator(master.address, name=f"s{i}") for i in range(n)]
    try:
        joined = run_parallel(
            [lambda c=c: join_group(c.connect(timeout=20), n, timeout=20) for c in comms], 40.0
        )
        assert not any(isinstance(r, BaseException) for r in joined), joined
        source = torch.randn(1 << 20, device="cuda")
        states = [
            pccl.SharedState({"w": source.clone(), "b": torch.arange(7, device="cuda")}, revision=1),
            pccl.SharedState({"w": torch.zeros(1 << 20, device="cuda"), "b": torch.zeros(7, dtype=torch.int64, device="cuda")}),
        ]
        strategies = [pccl.SyncStrategy.SEND_ONLY, pccl.SyncStrategy.RECEIVE_ONLY]
        res = run_parallel(
            [lambda c=c, s=s, k=k: c.sync_shared_state(s, strategy=k) for c, s, k in zip(comms, states, strategies)],
            60.0,
        )
        assert all(isinstance(r, pccl.SyncInfo) for r in res), res
        assert states[1].tensors["w"].is_cuda and torch.equal(states[1].tensors["w"], source)
        assert torch.equal(states[1].tensors["b"].cpu(), torch.arange(7))
        assert torch.equal(states[0].tensors["w"], source)
        assert states[0].hashes() == states[1].hashes()
    finally:
        for c in comms:
            c.close()
