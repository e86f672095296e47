"""Point-to-point of the torch.distributed backend "pccl" at 2 and 3 ranks: ping-pong,
isend/irecv of 64 MiB both ways at once, any-source receives naming the sender,
batch_isend_irecv ring exchange, sends around collectives, strided tensors, and a size
mismatch raising a typed error (tests/helpers/torch_p2p_workers.py checks each).

Ranks are separate processes started as torchrun would (pccl_py.tools.torch_bench.start);
every process is killed and reaped before a test returns.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pccl_py.tools.torch_bench import launch

WORKER = str(Path(__file__).parents[1] / "helpers" / "torch_p2p_workers.py")


@pytest.mark.parametrize("world", [2, 3])
def test_point_to_point(world: int) -> None:
    results = launch(world, [WORKER], timeout=240)
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {rank} exited with {code}:\n{err[-4000:]}"
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        assert lines, f"rank {rank} printed no report:\n{out[-2000:]}\n{err[-2000:]}"
        report = json.loads(lines[-1])
        assert report["failures"] == [], "\n".join(report["failures"])
        assert report["checks"] >= 6
