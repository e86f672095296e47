"""Fixtures shared by the test modules: an in-process master, a cluster of scripted
peer processes. Both are closed (processes killed, ports released) after each test."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The helper modules (peer processes, harnesses) live in tests/helpers/ and are imported
# by name, here, in the test modules and in the peer processes they spawn (a spawned
# process starts with this sys.path).
sys.path.insert(0, str(Path(__file__).parent / "helpers"))

from peer_workers import Cluster  # noqa: E402

import pccl_py as pccl


@pytest.fixture
def master() -> Iterator[pccl.Master]:
    with pccl.Master() as m:
        yield m


@pytest.fixture
def cluster(master: pccl.Master) -> Iterator[Cluster]:
    with Cluster(master.address) as c:
        yield c
