"""The contract between the Communicator (pccl_py.peer.communicator) and the call
groups mixed into it (attempts, allreduce, gather, sync, optimize, rejoin): what each
may use of the others. The Communicator implements all of it."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, Protocol

from pccl_py import _native
from pccl_py.config import Config
from pccl_py.events import EventLog
from pccl_py.peer.control import ControlChannel
from pccl_py.peer.session import OpKey, Session
from pccl_py.peer.state_fetch import ReceiveWindow
from pccl_py.types import Quantization, ReduceInfo, ReduceOp
from pccl_py.wire import protocol


class PeerCore(Protocol):
    config: Config
    peer_id: int
    _session: Session
    _control: ControlChannel | None
    _engine: _native.Engine | None
    _events: EventLog
    _rings: dict[int, tuple[int, ...]]
    _ring_only: set[int]
    _seq_lock: threading.Lock
    _next_seq: dict[int, int]
    _round: int
    _fresh: bool
    _receive_window: ReceiveWindow
    _joiners_wait: bool
    _executor: concurrent.futures.ThreadPoolExecutor | None
    _closed: bool
    _secret: bytes | None
    _group: int
    _advertise: str
    _name: str

    @property
    def epoch(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def rank(self) -> int: ...

    @staticmethod
    def _deadline(timeout: float | None, default: float) -> float: ...

    def _ask(
        self,
        request: protocol.Message,
        answer: Callable[[], Any],
        deadline: float,
        what: str,
        call: str,
        waiting: list[Any] | None = None,
    ) -> Any: ...

    def _report_blocked(self, call: str, op: OpKey | None = None) -> None: ...

    def _require(self) -> ControlChannel: ...

    def _ensure_ring(self, deadline: float) -> int: ...

    def _end_warmup(self) -> None: ...

    def _start_round(self) -> None: ...

    def ring_of(self, epoch: int) -> tuple[int, ...]: ...

    def _outcome(self, key: OpKey, ok: bool, kind: str, msg: str, culprit: int, deadline: float) -> protocol.Message: ...

    def _prepare(
        self, x: Any, op: ReduceOp, out: Any, tag: int | None, quantization: Any
    ) -> tuple[Any, Any, Any, ReduceOp, int, int, Quantization | None]: ...

    def _run_all_reduce(
        self,
        src: Any,
        dst: Any,
        dtype: Any,
        op: ReduceOp,
        tag: int,
        seq: int,
        quantization: Quantization | None,
        deadline: float,
        retry: bool,
        *,
        blocking: bool = False,
        attempt_key: list[OpKey] | None = None,
    ) -> ReduceInfo: ...

    def _number(self, call: str, tag: int | None) -> tuple[int, int, int]: ...

    def _run_attempts(
        self,
        call: str,
        tag: int,
        engine_tag: int,
        seq: int,
        start: Callable[[int, int, float], Any],
        desc: Callable[[], str],
        deadline: float,
        retry: bool,
        *,
        blocking: bool = False,
        attempt_key: list[OpKey] | None = None,
        precheck: Callable[[int], None] | None = None,
    ) -> Any: ...

    def _run_gather(
        self,
        call: str,
        x: Any,
        out: Any,
        tag: int | None,
        timeout: float | None,
        retry: bool,
        shape: Callable[[int, int], tuple[int, ...]],
        *,
        op: ReduceOp = ...,
        root: int = 0,
        run_async: bool = False,
    ) -> Any: ...

    def _rank_in(self, epoch: int) -> int: ...

    def _track(self, key: OpKey, handle: Any, retry: bool, desc: Callable[[], str]) -> None: ...

    def _untrack(self, key: OpKey) -> tuple[bool, bool]: ...

    def _op_executor(self) -> concurrent.futures.ThreadPoolExecutor: ...

    def _catch_up_round(self) -> None: ...
