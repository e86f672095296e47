"""Runs PyTorch's own DistributedTest suite (torch/testing/_internal/distributed/
distributed_test.py, shipped in the torch wheel) on a backend, the way pytorch's
test/distributed/test_distributed_spawn.py does: the environment picks the backend and
world size, and each test spawns WORLD_SIZE rank processes that meet through a file://
store (TestDistBackend's init method).

    BACKEND=pccl WORLD_SIZE=2 python tests/helpers/torch_dist_suite.py -k coalesced
    BACKEND=gloo WORLD_SIZE=2 python tests/helpers/torch_dist_suite.py -k coalesced

Arguments go to unittest (-k PATTERN, -v, a test name). The spawned ranks re-import this
module, so the backend is registered and the suite patched the same way in each. With
PCCL_SUITE_REPORT=FILE it also writes each test's outcome there as JSON
({"test_x": ["ok" | "skipped" | "failed" | "error", detail]}), which
tests/integration/test_torch_dist_suite.py reads.

The suite decides by backend name which tests apply. For a backend other than gloo,
nccl, ucc, mpi this module
- adds it to DistTestCases.backend_feature["plugin"] (a registered third-party backend),
  ["subgroup"] (pccl runs dist.new_group), ["ddp"] (DDP runs on it unchanged) and
  ["gpu"] / ["cuda"] (it takes CUDA tensors, staged through host memory), which is what
  pccl supports: the tests gated on these features run as they do for gloo (those that
  need GPUs still skip where there are none);
- runs the tests named in GLOO_GATED on it too: upstream gates them on gloo (or MPI) by
  name (require_backend_is_available({"gloo"}), "Only gloo backend supports timeouts",
  "Only MPI supports all_to_all", ...), although their bodies only call public
  torch.distributed collectives on CPU tensors (all_reduce_coalesced, barrier with a
  timeout, all_to_all(_single), sparse all_reduce, batch_isend_irecv,
  monitored_barrier, DDP with no_sync and comm hooks), so any backend that claims the
  call should pass them. Those of them whose body builds its model only for the names
  mpi, gloo and nccl (AS_GLOO_CPU) run with the suite reading "gloo" during the body.
Nothing else is changed: every other test keeps its upstream skip conditions.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import unittest
from typing import Any

os.environ.setdefault("BACKEND", "pccl")
os.environ.setdefault("WORLD_SIZE", "2")

from torch.testing._internal.common_distributed import DistTestCases

import pccl_py.torch  # noqa: F401  (registers "pccl", here and in every spawned rank)

BACKEND = os.environ["BACKEND"]
BUILTIN = {"gloo", "nccl", "ucc", "mpi"}
GLOO_GATED = (
    "test_all_reduce_coalesced_",
    # barrier(timeout): "Only gloo backend supports timeouts". (Not test_barrier_timeout_global:
    # it is also skipped unless INIT_METHOD is file://, and lifting the gate, which shares
    # the test's skip attribute, would lift that too.)
    "test_barrier_timeout_group",
    "test_barrier_timeout_full_group",
    # require_backend_is_available({"gloo"}): dist.monitored_barrier() (which torch
    # refuses for every backend but gloo by name; pccl_py.torch routes a pccl group's
    # call to the group's own method) or the group's method itself
    "test_monitored_barrier_gloo",
    "test_monitored_barrier_failure_order",
    "test_monitored_barrier_wait_all_ranks",
    # "Only MPI supports (CPU) all_to_all(_single)": gloo skips them too
    "test_all_to_all",
    # "Only Gloo backend supports sparse all reduce"
    "test_sparse_all_reduce_sum",
    # require_backend_is_available({"gloo"}): DDP's no_sync, scatter_object_list
    "test_grads_same_across_ranks_with_no_sync",
    "test_scatter_object_list",
    # "get_future is only supported on mpi, nccl and gloo": Work.get_future(), DDP's
    # no_sync with and without comm hooks (AS_GLOO_CPU below)
    "test_get_future",
    "test_accumulate_gradients_no_sync",
    # "GLOO Batch Send Recv CPU": batch_isend_irecv over CPU tensors (public point-to-point)
    "test_batch_isend_irecv_gloo",
)
# The upstream skip reasons GLOO_GATED lifts (any other skip of those tests stays).
BY_NAME = (
    "Only gloo backend supports timeouts",
    "Only MPI supports CPU all_to_all_single",
    "Only MPI supports all_to_all",
    "Only Gloo backend supports sparse all reduce",
    "get_future is only supported on mpi, nccl and gloo",
    "GLOO Batch Send Recv CPU",
)
FEATURES = ("plugin", "subgroup", "ddp", "gpu", "cuda")
# Lifted tests whose body picks its setup by backend name (`if BACKEND == "mpi" or
# BACKEND == "gloo": <a CPU model>` and nothing for any other name): they run with the
# suite's BACKEND reading "gloo" for the length of the body, which takes that CPU branch;
# the process group they use is still pccl's (initialized before the body).
AS_GLOO_CPU = ("test_accumulate_gradients_no_sync",)

if BACKEND not in BUILTIN:
    for _feature in FEATURES:
        DistTestCases.backend_feature[_feature].add(BACKEND)

import torch.testing._internal.distributed.distributed_test as _suite
from torch.testing._internal.distributed.distributed_test import (
    DistributedTest,
    TestDistBackend,
)


def _as_gloo_cpu(test: Any) -> Any:
    """`test` with the suite module's BACKEND set to "gloo" while its body runs."""

    @functools.wraps(test)
    def run(self: Any) -> Any:
        saved, _suite.BACKEND = _suite.BACKEND, "gloo"
        try:
            return test(self)
        finally:
            _suite.BACKEND = saved

    run.__unittest_skip__ = False  # type: ignore[attr-defined]
    return run


if BACKEND not in BUILTIN:
    for _name, _test in list(vars(DistributedTest._DistTestBase).items()):
        reason = getattr(_test, "__unittest_skip_why__", "")
        gated = (reason.startswith("Test requires backend") and "{'gloo'}" in reason) or reason in BY_NAME
        if _name.startswith(GLOO_GATED) and gated:
            _test.__unittest_skip__ = False
            if _name.startswith(AS_GLOO_CPU):
                setattr(DistributedTest._DistTestBase, _name, _as_gloo_cpu(_test))


class TestDistBackendWithSpawn(TestDistBackend, DistributedTest._DistTestBase):
    def setUp(self) -> None:
        super().setUp()
        self._spawn_processes()


class _RecordingResult(unittest.TextTestResult):
    """A TextTestResult that also keeps every test's outcome by method name, rewriting
    the report after each test (so a run cut short still tells what it ran)."""

    outcomes: dict[str, list[str]]
    report: str

    def _put(self, test: Any, outcome: str, detail: str = "") -> None:
        self.outcomes[test.id().rsplit(".", 1)[-1]] = [outcome, detail[-4000:]]
        with open(self.report, "w") as f:
            json.dump(self.outcomes, f)

    def addSuccess(self, test: Any) -> None:
        super().addSuccess(test)
        self._put(test, "ok")

    def addSkip(self, test: Any, reason: str) -> None:
        super().addSkip(test, reason)
        self._put(test, "skipped", reason)

    def addFailure(self, test: Any, err: Any) -> None:
        super().addFailure(test, err)
        self._put(test, "failed", self.failures[-1][1])

    def addError(self, test: Any, err: Any) -> None:
        super().addError(test, err)
        self._put(test, "error", self.errors[-1][1])


def main() -> None:
    report = os.environ.get("PCCL_SUITE_REPORT")
    if not report:
        unittest.main(argv=[sys.argv[0], *sys.argv[1:]])
        return
    outcomes: dict[str, list[str]] = {}

    class Result(_RecordingResult):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.outcomes = outcomes
            self.report = report

    with open(report, "w") as f:
        json.dump(outcomes, f)
    verbosity = 2 if "-v" in sys.argv else 1
    runner = unittest.TextTestRunner(resultclass=Result, verbosity=verbosity)
    unittest.main(argv=[sys.argv[0], *sys.argv[1:]], exit=False, testRunner=runner)


if __name__ == "__main__":
    main()
