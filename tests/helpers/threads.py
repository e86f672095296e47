"""Running callables side by side in threads, with a deadline (for tests whose peers
are threads of this process)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


def run_parallel(fns: list[Callable[[], Any]], timeout: float = 60.0) -> list[Any]:
    """Runs the callables in daemon threads; returns, per callable, its result or the
    exception it raised. Fails the test if one has not returned within `timeout`."""
    results: list[Any] = [None] * len(fns)
    done = [False] * len(fns)

    def body(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # returned to the caller, who asserts
            results[i] = exc
        done[i] = True

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [i for i, d in enumerate(done) if not d]
    assert not hung, f"calls {hung} did not return within {timeout}s"
    return results
