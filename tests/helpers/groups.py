"""Groups of communicators in this process (threads): the one place tests build "n
admitted peers" (the conftest fixture `make_group` wraps it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from threads import run_parallel

import pccl_py as pccl


def connect_group(
    address: str,
    n: int,
    *,
    members: Sequence[pccl.Communicator] = (),
    name: str = "t",
    timeout: float = 30.0,
    **kwargs: Any,
) -> list[pccl.Communicator]:
    """Connects n new communicators (Communicator(address, **kwargs)) while the admitted
    `members` let them in, until the group has len(members) + n peers. On failure the
    new ones are closed and the first error is raised."""
    world = len(members) + n
    comms = [pccl.Communicator(address, name=f"{name}{i}", **kwargs) for i in range(n)]

    def joiner(c: pccl.Communicator) -> None:
        c.connect(timeout=timeout)
        pccl.join_group(c, world, timeout=timeout)

    results = run_parallel(
        [lambda c=c: joiner(c) for c in comms] + [lambda c=c: pccl.join_group(c, world, timeout=timeout) for c in members],
        timeout=timeout + 30,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for c in comms:
            c.close()
        raise errors[0]
    assert all(c.world_size == world for c in [*members, *comms])
    return comms
