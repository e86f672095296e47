"""Fixtures shared by the test modules: an in-process master, a cluster of scripted
peer processes. Both are closed (processes killed, ports released) after each test."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The helper modules (peer processes, harnesses) live in tests/helpers/ and are imported
# by name, here, in the test modules and in the peer processes they spawn (a spawned
# process starts with this sys.path).
sys.path.insert(0, str(Path(__file__).parent / "helpers"))

from groups import connect_group
from peer_workers import Cluster

import pccl_py as pccl


@pytest.fixture
def master() -> Iterator[pccl.Master]:
    with pccl.Master() as m:
        yield m


@pytest.fixture
def make_group(master: pccl.Master) -> Iterator[Callable[..., list[pccl.Communicator]]]:
    """make_group(n, **communicator_kwargs) -> n admitted communicators of `master`,
    threads of this process, closed at teardown; make_group(k, members=[...]) adds k
    joiners to the group of `members`."""
    created: list[pccl.Communicator] = []

    def make(n: int, members: list[pccl.Communicator] | None = None, **kwargs: Any) -> list[pccl.Communicator]:
        comms = connect_group(master.address, n, members=members or (), name=f"t{len(created)}-", **kwargs)
        created.extend(comms)
        return comms

    try:
        yield make
    finally:
        for c in created:
            c.close()


@pytest.fixture
def cluster(master: pccl.Master) -> Iterator[Cluster]:
    with Cluster(master.address) as c:
        yield c
