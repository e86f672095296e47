"""PyTorch's own DistributedTest suite (torch 2.13's distributed_test._DistTestBase) on
the "pccl" backend, through tests/helpers/torch_dist_suite.py, at 2 and 3 ranks.

By default a chosen set (QUICK) that covers what the pccl backend adds beyond
test_torch_backend.py, within about four minutes on a 2-core machine: all_to_all and
all_to_all_single (even and uneven splits, complex, the full group), barrier timeouts,
monitored_barrier (the group's and dist.monitored_barrier), sparse all-reduce, object
collectives, Work.get_future, DDP's no_sync, and point-to-point (any-source, tags, batch_isend_irecv). Every chosen test must pass: a skip counts as a failure, since it would hide
what is not run. All the tests of one world size run in one subprocess (each spawns its
own ranks), so a hang costs one timeout, and every process it started is gone when it
returns. Tests upstream gates on backend names although pccl has what they use run too
(GLOO_GATED in the helper).

PCCL_TORCH_SUITE=full (`make torch-suite`) runs every test of the suite instead, but
those in EXCLUDED, at both world sizes, on gloo and then on pccl: every test gloo passes
must pass on pccl, and no test may fail on pccl (a skip by the suite's own conditions,
GPUs or world size, is fine). EXCLUDED names each test the pccl backend does not pass,
and why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

SUITE = Path(__file__).parents[1] / "helpers" / "torch_dist_suite.py"
FULL = os.environ.get("PCCL_TORCH_SUITE") == "full"

# Run at each world size by default. Chosen for what they exercise, not for passing:
# each is a test gloo passes too.
QUICK: dict[int, tuple[str, ...]] = {
    2: (
        "test_all_to_all",
        "test_all_to_all_single_unequal_split",
        "test_barrier_timeout_full_group",
        "test_monitored_barrier_gloo_rank_0_timeout",
        "test_monitored_barrier_gloo",  # dist.monitored_barrier() routed to the group
        "test_accumulate_gradients_no_sync_allreduce_hook",
        "test_sparse_all_reduce_sum",
        "test_get_future",
        "test_grads_same_across_ranks_with_no_sync",
        "test_scatter_object_list",
        "test_send_recv_any_source",
        "test_batch_isend_irecv_gloo_tags",
    ),
    3: (
        # (the suite's *_group tests need 8 ranks: these run the full group at 3)
        "test_all_to_all_full_group",
        "test_all_to_all_single_unequal_split_full_group",
        "test_sparse_all_reduce_sum",  # rows at unaligned offsets show from 3 ranks on
        "test_barrier_timeout_full_group",
        "test_all_gather_object_subgroup",
        "test_send_recv_with_tag",
        "test_monitored_barrier_gloo",
    ),
}

# Tests of the suite the pccl backend does not pass, and why. (Tests the suite itself
# skips for pccl, e.g. for want of GPUs, are not listed: the full run reports them.)
EXCLUDED: dict[str, str] = {}  # none


def _suite_tests() -> list[str]:
    """Every test of torch's _DistTestBase, by name (read without importing it as a
    test module: it reads BACKEND/WORLD_SIZE at import)."""
    code = (
        "import os; os.environ.setdefault('BACKEND', 'gloo'); os.environ.setdefault('WORLD_SIZE', '2');"
        "from torch.testing._internal.distributed.distributed_test import DistributedTest as D;"
        "print('\\n'.join(n for n in vars(D._DistTestBase) if n.startswith('test_')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.split()


def _selected(world: int) -> list[str]:
    if not FULL:
        return list(QUICK[world])
    return [t for t in _suite_tests() if t not in EXCLUDED]


def _run(world: int, tests: list[str], tmp: Path, backend: str = "pccl") -> dict[str, list[str]]:
    """Runs `tests` on `backend` at `world` ranks in one subprocess; returns each test's
    [outcome, detail]. The subprocess's process group is killed on the way out."""
    report = tmp / f"report-{backend}-{world}.json"
    env = {**os.environ, "BACKEND": backend, "WORLD_SIZE": str(world), "PCCL_SUITE_REPORT": str(report)}
    env.pop("TEMP_DIR", None)  # each test makes its own (TestDistBackend.setUp)
    names = [f"TestDistBackendWithSpawn.{t}" for t in tests]
    budget = 60 + 40 * len(tests)
    proc = subprocess.Popen([sys.executable, str(SUITE), *names], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        pytest.fail(f"the suite on {backend} at {world} ranks ran past {budget} s:\n{out[-6000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert report.exists(), f"the suite wrote no report (exit {proc.returncode}):\n{out[-6000:]}"
    outcomes: dict[str, list[str]] = json.loads(report.read_text())
    return outcomes


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: Any) -> Callable[[int], dict[str, list[str]]]:
    """outcomes(world): the selected tests' outcomes at `world` ranks, run at the first ask."""
    tmp = tmp_path_factory.mktemp("torch-suite")
    cache: dict[int, dict[str, list[str]]] = {}

    def get(world: int) -> dict[str, list[str]]:
        if world not in cache:
            cache[world] = _run(world, _selected(world), tmp)
        return cache[world]

    return get


def _cases() -> list[Any]:
    return [pytest.param(w, t, id=f"{w}-{t}") for w in (2, 3) for t in QUICK[w]]


if FULL:

    @pytest.mark.timeout(6 * 3600)
    @pytest.mark.parametrize("world", [2, 3])
    def test_the_whole_suite_passes_or_skips(outcomes: Callable[[int], dict[str, list[str]]], tmp_path: Path, world: int) -> None:
        gloo = _run(world, _selected(world), tmp_path, backend="gloo")
        got = outcomes(world)
        bad = {t: o for t, o in got.items() if o[0] not in ("ok", "skipped")}
        missing = sorted(set(_selected(world)) - set(got))
        behind = sorted(t for t, o in gloo.items() if o[0] == "ok" and got.get(t, ["not run"])[0] != "ok")
        for name, report in (("gloo", gloo), ("pccl", got)):
            passed = sum(o[0] == "ok" for o in report.values())
            skipped = sum(o[0] == "skipped" for o in report.values())
            print(f"{world} ranks, {name}: {passed} passed, {skipped} skipped, {len(report) - passed - skipped} failed")
        assert not bad and not missing and not behind, "\n\n".join(
            [f"{t}: {o[0]}\n{o[1]}" for t, o in sorted(bad.items())]
            + [f"not run: {missing}", f"passed on gloo, not on pccl: {behind}"]
        )

else:

    @pytest.mark.timeout(600)
    @pytest.mark.parametrize(("world", "test"), _cases())
    def test_chosen_suite_test_passes(outcomes: Callable[[int], dict[str, list[str]]], world: int, test: str) -> None:
        outcome, detail = outcomes(world).get(test, ["not run", ""])
        assert outcome == "ok", f"{test} at {world} ranks: {outcome}\n{detail}"


def test_quick_and_excluded_lists_name_real_tests() -> None:
    """A renamed upstream test must not silently drop out of either list."""
    names = set(_suite_tests())
    assert not {t for ts in QUICK.values() for t in ts} - names
    assert not set(EXCLUDED) - names
    assert not {t for ts in QUICK.values() for t in ts} & set(EXCLUDED)
