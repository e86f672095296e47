"""The dispatcher of a pccl process group's collectives: several in flight at once,
started in call order, each on a pccl tag of its own.

The i-th collective of a group runs on tag 1 + i % max_inflight and starts once the one
before it on that tag has ended, so the numbering is identical on every rank (torch
already requires every rank to issue a group's collectives in the same order). A
collective whose tensors share storage with one still running waits for it, and one
that names no tensors (a barrier) waits for every collective before it and holds back
the ones after it. Starting in call order cannot deadlock: every collective waits only
for earlier ones, which every rank has started.

Failure: the first PcclError of a collective poisons the group, as in Gloo: collectives
started after it fail at once with it; those already running end on their own.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch.futures import Future

from pccl_py import PcclError
from pccl_py.torch.errors import PcclBackendError

log = logging.getLogger(__name__)

Run = Callable[[], list[torch.Tensor]]


class _Queued(NamedTuple):
    run: Run
    future: Future[Any]
    touches: frozenset[int] | None  # storages of the tensors it reads or writes; None: unknown


class Dispatcher:
    """Runs queued collectives (see the module's docstring). `exclusive()`: when true, a
    collective runs alone (the group is still learning its rank table).

    No thread of its own: submit() starts a collective on a runner thread at once when
    its tag and tensors are free, and the runner that frees them starts the ones
    waiting behind it, so a collective costs one thread hand-off, not two."""

    def __init__(self, rank: int, max_inflight: int | None, exclusive: Callable[[], bool]) -> None:
        self.max_inflight = max_inflight if max_inflight is not None else _default_inflight()
        if self.max_inflight < 1:
            raise PcclBackendError(f"max_inflight must be at least 1, got {self.max_inflight}")
        self.failure: BaseException | None = None
        self._rank = rank
        self._exclusive = exclusive
        self._state = threading.Condition()  # guards the fields below
        self._waiting: collections.deque[_Queued] = collections.deque()  # not started yet, in call order
        self._index = 0  # collectives taken off the queue: the next one runs on tag 1 + index % max_inflight
        self._running: dict[int, frozenset[int] | None] = {}  # tag -> storages touched
        self._closing = False
        self._op_tag = threading.local()  # the tag of the collective a runner thread runs
        self._runners = concurrent.futures.ThreadPoolExecutor(
            self.max_inflight, thread_name_prefix="pccl-torch-op"
        )

    @property
    def tag(self) -> int:
        """The pccl tag of the collective the calling runner thread runs."""
        return int(getattr(self._op_tag, "value", 0))

    def submit(self, run: Run, tensors: Sequence[Any] | None, future: Future[Any]) -> None:
        """Queues `run`, whose result or error completes `future`; `tensors`: every
        tensor it reads or writes (None: unknown)."""
        item = _Queued(run, future, _storages(tensors))
        with self._state:
            if self._closing:
                raise PcclBackendError("the pccl process group has been shut down")
            self._waiting.append(item)
            ready = self._take_ready()
        self._launch(ready)

    def close(self, timeout: float) -> None:
        """Lets the queued collectives end, then stops (waits up to `timeout`)."""
        with self._state:
            self._closing = True
            idle = self._state.wait_for(lambda: not self._waiting and not self._running, timeout)
        self._runners.shutdown(wait=idle)

    def _take_ready(self) -> list[tuple[_Queued, int | None]]:
        """Takes the collectives at the head of the queue that may start now, in call
        order: (item, its tag), or (item, None) for one to fail at once (the group
        failed before it started). Call with the lock held."""
        ready: list[tuple[_Queued, int | None]] = []
        while self._waiting:
            item = self._waiting[0]
            tag = 1 + self._index % self.max_inflight
            touches = None if self._exclusive() else item.touches
            if tag in self._running or self._conflicts(touches):
                break  # and every collective after it waits too: they start in call order
            self._waiting.popleft()
            self._index += 1
            if self.failure is not None:
                ready.append((item, None))
                continue
            self._running[tag] = touches
            ready.append((item, tag))
        return ready

    def _launch(self, ready: list[tuple[_Queued, int | None]]) -> None:
        """Starts (or fails) what _take_ready() took, outside the lock: completing a
        future runs its callbacks."""
        for item, tag in ready:
            if tag is None:
                item.future.set_exception(
                    PcclBackendError(f"the pccl process group failed earlier and cannot be used: {self.failure}")
                )
                continue
            try:
                self._runners.submit(self._run_one, item, tag)
            except RuntimeError as exc:  # shut down (close() gave up waiting)
                with self._state:
                    del self._running[tag]
                    self._state.notify_all()
                item.future.set_exception(PcclBackendError(f"the pccl process group has been shut down: {exc}"))

    def _conflicts(self, touches: frozenset[int] | None) -> bool:
        if not self._running:
            return False
        if touches is None:
            return True
        return any(other is None or other & touches for other in self._running.values())

    def _run_one(self, item: _Queued, tag: int) -> None:
        self._op_tag.value = tag
        try:
            result = item.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter, never lost
            error = exc if isinstance(exc, PcclBackendError) else PcclBackendError(f"pccl: {exc}")
            if isinstance(exc, PcclError):  # the group is broken (peer lost, timeout, shrunk)
                if error is not exc:
                    error.__cause__ = exc
                if self.failure is None:
                    self.failure = error
                log.error("pccl collective failed on rank %d: %s", self._rank, exc)
            outcome: tuple[bool, Any] = (False, error)
        else:
            outcome = (True, result)
        finally:
            with self._state:
                del self._running[tag]
                ready = self._take_ready()
                self._state.notify_all()
        # The collectives this one held back start first; then this one completes,
        # after its slot is free: a waiter that issues its next collective at once
        # never finds this one still holding its tag or its tensors.
        self._launch(ready)
        if outcome[0]:
            item.future.set_result(outcome[1])
        else:
            item.future.set_exception(outcome[1])


def _storages(tensors: Sequence[Any] | None) -> frozenset[int] | None:
    """The storages (by address) of `tensors` and of tensors in nested lists; None if
    not given or not comparable (sparse)."""
    if tensors is None:
        return None
    found: set[int] = set()
    pending = list(tensors)
    while pending:
        t = pending.pop()
        if isinstance(t, torch.Tensor):
            if t.layout != torch.strided:
                return None
            found.add(t.untyped_storage().data_ptr())
        elif isinstance(t, list | tuple):
            pending.extend(t)
    return frozenset(found)


def _default_inflight() -> int:
    raw = os.environ.get("PCCL_TORCH_INFLIGHT", "4")
    try:
        return int(raw)
    except ValueError:
        raise PcclBackendError(f"PCCL_TORCH_INFLIGHT must be an integer, got {raw!r}") from None
