"""Fixtures shared by the test modules: an in-process master, a cluster of scripted
peer processes. Both are closed (processes killed, ports released) after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from peer_workers import Cluster

import pccl_py as pccl


@pytest.fixture
def master() -> Iterator[pccl.Master]:
    with pccl.Master() as m:
        yield m


@pytest.fixture
def cluster(master: pccl.Master) -> Iterator[Cluster]:
    with Cluster(master.address) as c:
        yield c
