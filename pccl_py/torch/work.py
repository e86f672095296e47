"""PcclWork: the torch.distributed Work a queued collective of the "pccl" backend
returns, backed by a torch Future the group's worker thread completes."""

from __future__ import annotations

import datetime
import threading
from typing import Any

import torch
import torch.distributed as dist
from torch.futures import Future

from pccl_py.torch.errors import PcclBackendError


class PcclWork(dist.Work):
    """A queued collective. wait() raises the op's error (torch's future-wrapping Work
    would return without raising); get_future() is what DDP's reducer chains on."""

    def __init__(self, future: Future[Any]) -> None:
        super().__init__()
        self._future = future
        # torch's C++ callers (DDP's reducer) must not see the Python exception object
        # itself: rethrown there without the GIL it crashes the process. A `then`
        # callback turns it into a C++ error carrying the same message.
        self._chained = future.then(_value_of)

    def wait(self, timeout: datetime.timedelta = datetime.timedelta(0)) -> bool:
        seconds = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else 0.0
        if seconds > 0 and not self._wait_done(seconds):
            raise PcclBackendError(f"the collective did not finish within {seconds}s")
        self._future.wait()  # raises the collective's error
        return True

    def _wait_done(self, seconds: float) -> bool:
        done = threading.Event()
        self._future.add_done_callback(lambda _: done.set())
        return done.wait(seconds)

    def get_future(self) -> Future[Any]:
        return self._chained

    def is_completed(self) -> bool:
        return self._future.done()

    def is_success(self) -> bool:
        if not self._future.done():
            return False
        try:
            self._future.value()
        except Exception:  # noqa: BLE001 - the op's error, whatever it is, means "not successful"
            return False
        return True

    def exception(self) -> BaseException | None:
        if not self._future.done():
            return None
        try:
            self._future.value()
        except Exception as exc:  # noqa: BLE001 - handed to the caller as the op's exception
            return exc
        return None

    def result(self) -> list[torch.Tensor]:
        self._future.wait()
        return list(self._future.value())

    def synchronize(self) -> None:
        self.wait()


def _value_of(future: Future[Any]) -> Any:
    return future.value()
