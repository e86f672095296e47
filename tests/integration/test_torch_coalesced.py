"""torch's coalesced collectives on the "pccl" backend: all_gather_coalesced (output
list r holds rank r's inputs, which differ in shape), all_reduce_coalesced over tensors
of different shapes and dtypes, and the ProcessGroup methods allgather_coalesced,
allreduce_coalesced, allgather_into_tensor_coalesced and reduce_scatter_tensor_coalesced.
Every output slot is checked against the value computed locally, and at world size 2
(where a sum has one order) pccl's outputs must equal gloo's bit for bit wherever gloo
takes the call.

Ranks are separate processes started as torchrun would (pccl_py.tools.torch_bench.launch);
tests/helpers/torch_coalesced_workers.py is what each runs. The last test runs a few of
PyTorch's own DistributedTest cases for these collectives on pccl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from pccl_py.tools.torch_bench import launch

WORKER = str(Path(__file__).parents[1] / "helpers" / "torch_coalesced_workers.py")


def _run(tmp_path: Path, backend: str, world: int) -> tuple[list[dict[str, Any]], list[dict[str, dict[str, torch.Tensor]]]]:
    prefix = tmp_path / f"{backend}-{world}"
    results = launch(world, [WORKER, "--backend", backend, "--save", str(prefix)], timeout=180)
    reports = []
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"{backend} rank {rank} exited with {code}:\n{err[-4000:]}"
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        assert lines, f"{backend} rank {rank} printed no report:\n{out[-2000:]}\n{err[-2000:]}"
        reports.append(json.loads(lines[-1]))
    return reports, [torch.load(f"{prefix}.rank{r}.pt") for r in range(world)]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("world", [2, 3])
def test_coalesced_collectives_are_correct(tmp_path: Path, world: int) -> None:
    reports, _ = _run(tmp_path, "pccl", world)
    for report in reports:
        assert report["failures"] == [], "\n".join(report["failures"])  # a silent wrong result
        assert report["raised"] == {}, report["raised"]
        assert report["checks"] > 150


def test_coalesced_collectives_match_gloo(tmp_path: Path) -> None:
    pccl_reports, pccl_outputs = _run(tmp_path, "pccl", 2)
    gloo_reports, gloo_outputs = _run(tmp_path, "gloo", 2)
    for report in pccl_reports:
        assert report["raised"] == {} and report["failures"] == [], report
    # gloo refuses mixed dtypes in allreduce_coalesced and garbles them in the two
    # all-gathers (torch's frontend never sends it mixed dtypes): compare where gloo is right.
    for rank, (report, mine, theirs) in enumerate(zip(gloo_reports, pccl_outputs, gloo_outputs, strict=True)):
        compared = [case for case in theirs if case not in report["failed"]]
        frontend = [case for case in mine if not case.startswith(("pg.", "coalescing manager"))]
        assert set(frontend) <= set(compared), (frontend, report["failed"], report["raised"])
        for case in compared:
            for label, want in theirs[case].items():
                got = mine[case][label]
                assert got.dtype == want.dtype and got.shape == want.shape, (rank, case, label)
                assert torch.equal(_bytes(got), _bytes(want)), f"rank {rank} {case} {label}: {got} != gloo's {want}"


SUITE = str(Path(__file__).parents[1] / "helpers" / "torch_dist_suite.py")
UPSTREAM = [
    "test_all_gather_coalesced_simple",
    "test_all_gather_coalesced_with_empty",
    "test_all_reduce_coalesced_sum",
    "test_all_reduce_coalesced_max",
]


def test_pytorchs_distributed_test_coalesced_cases_pass() -> None:
    # A few of PyTorch's own DistributedTest cases (tests/helpers/torch_dist_suite.py runs
    # any of them): every one must run, none skipped, and pass.
    env = dict(os.environ, BACKEND="pccl", WORLD_SIZE="2")
    names = [f"TestDistBackendWithSpawn.{name}" for name in UPSTREAM]
    proc = subprocess.run([sys.executable, SUITE, "-v", *names], check=False, env=env, capture_output=True, text=True, timeout=240)
    tail = proc.stderr[-6000:]
    assert proc.returncode == 0, tail
    assert f"Ran {len(UPSTREAM)} tests" in proc.stderr and "skipped" not in proc.stderr, tail
