"""`pccl bench --op`: the all-gather, reduce-scatter, broadcast and all-to-all on loopback next to
gloo and the Communicator (each worker checks its result before timing), the busbw
convention of nccl-tests, and the arguments refused."""

from __future__ import annotations

import pytest

from pccl_py.tools import bench
from pccl_py.tools.bench.report import bus_factor

pytestmark = pytest.mark.timeout(240)


def test_bus_factors_follow_nccl_tests() -> None:
    assert bus_factor(4) == bus_factor(4, "all_reduce") == 1.5
    assert bus_factor(4, "all_gather") == bus_factor(4, "reduce_scatter") == bus_factor(4, "all_to_all") == 0.75
    assert bus_factor(4, "broadcast") == 1.0


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"op": "scatter"}, "unknown collective"),
        ({"op": "all_gather", "quantization": ("minmax:uint8",)}, "all-reduce only"),
        ({"op": "reduce_scatter", "peers": (3,), "sizes": (1024,)}, "split"),
        ({"op": "all_to_all", "peers": (3,), "sizes": (1024,)}, "split"),
        ({"wan_cc": "cubic"}, "needs --wan"),
    ],
)
def test_bad_arguments_are_refused(changes: dict, match: str) -> None:
    cfg = bench.BenchConfig(**{"peers": (2,), "sizes": (4096,), **changes})
    with pytest.raises(ValueError, match=match):
        cfg.validate()


@pytest.mark.parametrize(
    ("op", "compare"),
    [("all_gather", ("gloo", "comm")), ("reduce_scatter", ("gloo",)), ("broadcast", ("comm",)),
     ("all_to_all", ("gloo", "comm"))],
)
def test_each_op_runs_checked_next_to_the_others(op: str, compare: tuple[str, ...]) -> None:
    cc = "reno" if op == "broadcast" else "bbr"  # what pccl's and comm's data connections ask for
    cfg = bench.BenchConfig(
        peers=(3,), sizes=(3 << 16,), compare=compare, iters=2, warmup=1, op=op, op_timeout=30.0, start_timeout=90.0,
        congestion_control=cc,
    )
    results = bench.run_benchmark(cfg)
    assert sorted(r.impl for r in results) == sorted(("pccl", *compare))
    for r in results:
        assert r.op == op and r.to_json()["collective"] == op
        assert r.busbw_gbps == pytest.approx(r.algbw_gbps * bus_factor(3, op))
        assert r.to_json().get("congestion_control") == (cc if r.impl in ("pccl", "comm") else None)
        if r.impl == "pccl":  # auto K on loopback: one connection per pool, reported as chosen
            assert r.pool_sizes == (1,) and r.label.startswith("pccl K=auto(1) ")
