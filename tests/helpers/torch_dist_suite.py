"""Runs PyTorch's own DistributedTest suite (torch/testing/_internal/distributed/
distributed_test.py, shipped in the torch wheel) on a backend, the way pytorch's
test/distributed/test_distributed_spawn.py does: the environment picks the backend and
world size, and each test spawns WORLD_SIZE rank processes that meet through a file://
store (TestDistBackend's init method).

    BACKEND=pccl WORLD_SIZE=2 python tests/helpers/torch_dist_suite.py -k coalesced
    BACKEND=gloo WORLD_SIZE=2 python tests/helpers/torch_dist_suite.py -k coalesced

Arguments go to unittest (-k PATTERN, -v, a test name). The spawned ranks re-import this
module, so the backend is registered and the suite patched the same way in each.

The suite decides by backend name which tests apply. For a backend other than gloo,
nccl, ucc, mpi this module
- adds it to DistTestCases.backend_feature["plugin"] (a registered third-party backend)
  and ["subgroup"] (pccl runs dist.new_group), which is what pccl supports;
- runs the tests named in GLOO_GATED on it too: upstream gates them with
  require_backend_is_available({"gloo"}), although their bodies only call public
  torch.distributed collectives on CPU tensors (all_reduce_coalesced), so any backend
  that claims the collective should pass them; likewise GLOO_GATED_P2P
  (batch_isend_irecv on CPU tensors, gated by the reason "GLOO Batch Send Recv CPU").
Nothing else is changed: every other test keeps its upstream skip conditions.
"""

from __future__ import annotations

import os
import sys
import unittest

os.environ.setdefault("BACKEND", "pccl")
os.environ.setdefault("WORLD_SIZE", "2")

from torch.testing._internal.common_distributed import DistTestCases

import pccl_py.torch  # noqa: F401  (registers "pccl", here and in every spawned rank)

BACKEND = os.environ["BACKEND"]
BUILTIN = {"gloo", "nccl", "ucc", "mpi"}
GLOO_GATED = ("test_all_reduce_coalesced_",)
# Gated by name with a reason of their own; their bodies only run batch_isend_irecv over
# CPU tensors (public point-to-point), which pccl implements.
GLOO_GATED_P2P = ("test_batch_isend_irecv_gloo",)

if BACKEND not in BUILTIN:
    DistTestCases.backend_feature["plugin"].add(BACKEND)
    DistTestCases.backend_feature["subgroup"].add(BACKEND)

from torch.testing._internal.distributed.distributed_test import (
    DistributedTest,
    TestDistBackend,
)

if BACKEND not in BUILTIN:
    for _name, _test in vars(DistributedTest._DistTestBase).items():
        reason = getattr(_test, "__unittest_skip_why__", "")
        if _name.startswith(GLOO_GATED) and reason.startswith("Test requires backend") and "{'gloo'}" in reason:
            _test.__unittest_skip__ = False
        if _name.startswith(GLOO_GATED_P2P) and reason == "GLOO Batch Send Recv CPU":
            _test.__unittest_skip__ = False


class TestDistBackendWithSpawn(TestDistBackend, DistributedTest._DistTestBase):
    def setUp(self) -> None:
        super().setUp()
        self._spawn_processes()


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], *sys.argv[1:]])
