"""The pccl process group's dispatcher: several collectives in flight at once, each on
a tag of its own, in call order; tensors shared with a running collective wait for it.

A fake Communicator stands in for the real one, so that when each op starts and ends is
under the test's control (the multi-process tests in test_torch_backend.py run the same
paths on real groups)."""

from __future__ import annotations

import datetime
import threading
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from pccl_py import ReduceOp  # noqa: E402
from pccl_py.errors import PeerLost  # noqa: E402
from pccl_py.torch.errors import PcclBackendError  # noqa: E402
from pccl_py.torch.process_group import ProcessGroupPccl  # noqa: E402

WAIT = 10.0


class FakeComm:
    """all_reduce that records (tag, event) and blocks while the test holds the tag."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[str, int]] = []
        self.held: dict[int, threading.Event] = {}
        self.started = threading.Condition(self.lock)
        self.running: set[int] = set()
        self.most_at_once = 0
        self.fail_tags: set[int] = set()

    def hold(self, tag: int) -> threading.Event:
        with self.lock:
            event = self.held[tag] = threading.Event()
        return event

    def all_reduce(self, buf: Any, op: ReduceOp, tag: int = 0, timeout: float | None = None, **_: Any) -> Any:
        with self.lock:
            self.log.append(("start", tag))
            self.running.add(tag)
            self.most_at_once = max(self.most_at_once, len(self.running))
            self.started.notify_all()
            event = self.held.get(tag)
        if event is not None:
            assert event.wait(WAIT), f"tag {tag} held too long"
        with self.lock:
            self.running.discard(tag)
            self.log.append(("end", tag))
            failing = tag in self.fail_tags
        if failing:
            raise PeerLost("peer 7 is gone", peer=7)
        buf.mul_(2)
        return SimpleNamespace(world_size=2)

    def wait_started(self, tag: int, count: int = 1, timeout: float = WAIT) -> bool:
        with self.lock:
            return self.started.wait_for(lambda: self.log.count(("start", tag)) >= count, timeout)

    def close(self) -> None:
        pass


def _group(comm: FakeComm, max_inflight: int) -> Any:
    pg = ProcessGroupPccl(
        comm,  # type: ignore[arg-type]
        rank=0,
        size=2,
        timeout=datetime.timedelta(seconds=30),
        peer_ranks={1: 0, 2: 1},
        max_inflight=max_inflight,
    )
    return pg


def _all_reduce(pg: Any, t: Any) -> Any:
    opts = torch.distributed.AllreduceOptions()
    return pg.allreduce([t], opts)


def test_a_later_collective_completes_while_an_earlier_one_runs() -> None:
    comm = FakeComm()
    pg = _group(comm, 4)
    try:
        release = comm.hold(1)
        a, b = torch.ones(4), torch.ones(4)
        first = _all_reduce(pg, a)
        second = _all_reduce(pg, b)
        second.wait()  # would wait forever (tag 1 is held) if the ops ran one at a time
        assert not first.is_completed()
        assert torch.equal(b, torch.full((4,), 2.0))
        release.set()
        first.wait()
        assert torch.equal(a, torch.full((4,), 2.0))
        assert comm.most_at_once == 2
    finally:
        pg.shutdown()


def test_tags_cycle_in_call_order_and_a_tag_is_reused_only_once_free() -> None:
    comm = FakeComm()
    pg = _group(comm, 3)
    try:
        release = comm.hold(1)
        works = [_all_reduce(pg, torch.ones(2)) for _ in range(5)]
        for w in works[1:3]:
            w.wait()
        assert comm.wait_started(1)
        # The 4th collective needs tag 1 again: it may not start while the first holds it.
        assert not comm.wait_started(1, count=2, timeout=0.5)
        assert not works[3].is_completed()
        release.set()
        for w in works:
            w.wait()
        starts = [tag for what, tag in comm.log if what == "start"]
        assert sorted(starts[:3]) == [1, 2, 3]
        assert sorted(starts) == [1, 1, 2, 2, 3]
        ends_of_1 = [i for i, e in enumerate(comm.log) if e == ("end", 1)]
        second_start_of_1 = [i for i, e in enumerate(comm.log) if e == ("start", 1)][1]
        assert ends_of_1[0] < second_start_of_1
    finally:
        pg.shutdown()


def test_a_collective_on_a_tensor_in_flight_waits_for_it() -> None:
    comm = FakeComm()
    pg = _group(comm, 4)
    try:
        release = comm.hold(1)
        t = torch.ones(8)
        first = _all_reduce(pg, t)
        second = _all_reduce(pg, t[:4])  # a view: same storage
        assert comm.wait_started(1)
        assert not comm.wait_started(2, timeout=0.5), "the view's op started while the tensor was in flight"
        release.set()
        first.wait()
        second.wait()
        assert torch.equal(t[:4], torch.full((4,), 4.0))
        assert torch.equal(t[4:], torch.full((4,), 2.0))
    finally:
        pg.shutdown()


def test_barrier_waits_for_every_collective_before_it() -> None:
    comm = FakeComm()
    pg = _group(comm, 4)
    try:
        release = comm.hold(1)
        first = _all_reduce(pg, torch.ones(2))
        assert comm.wait_started(1)
        barrier = pg.barrier(torch.distributed.BarrierOptions())
        assert not comm.wait_started(2, timeout=0.5), "the barrier started while a collective before it ran"
        release.set()
        barrier.wait()
        first.wait()
        assert comm.log.index(("end", 1)) < comm.log.index(("start", 2))
    finally:
        pg.shutdown()


def test_a_failure_fails_the_collectives_queued_after_it() -> None:
    comm = FakeComm()
    comm.fail_tags.add(1)
    pg = _group(comm, 2)
    try:
        release = comm.hold(1)
        failing = _all_reduce(pg, torch.ones(2))
        fine = _all_reduce(pg, torch.ones(2))  # runs beside the failing one: its own outcome
        fine.wait()
        release.set()
        with pytest.raises(PcclBackendError, match="peer 7"):
            failing.wait()
        later = _all_reduce(pg, torch.ones(2))
        with pytest.raises(PcclBackendError, match="failed earlier"):
            later.wait()
    finally:
        pg.shutdown()


def test_max_inflight_must_be_positive() -> None:
    with pytest.raises(PcclBackendError, match="max_inflight"):
        _group(FakeComm(), 0)
