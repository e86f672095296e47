"""The attempt loop every data-plane collective of the Communicator runs (all-reduce,
all-gather, reduce-scatter, broadcast; mixed into it): step numbering, one attempt on
the engine, the commit vote or the master's verdict, and the retry over the survivors.

Every op runs in three steps: the data plane moves the bytes peer to peer; each
participant commits on its own once the commit vote came round, or reports its local
result to the master; the master decides one outcome for everyone
(pccl_py.master.membership), so an op succeeds on all survivors or fails on all of
them. A failed attempt leaves the caller's input intact, so it can be re-run over the
survivors.

Each kind of collective numbers its steps apart: its ops run on engine tags of their
own (the user's tag plus the kind above bit 32), so peers that call different
collectives never meet in one op. They block on different ops, which the master's
mismatch rule turns into CollectiveMismatch on every peer (docs/protocol.md,
"Mismatched collectives")."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pccl_py.errors import FailureKind, InvalidArgument, PcclError, error_class, failure_kind
from pccl_py.peer.contract import PeerCore
from pccl_py.peer.session import ATTEMPT_BITS, OpKey
from pccl_py.wire import protocol

# Engine step = round << 40 | step << 8 | attempt. The round changes at each topology
# vote (when every member restarts its step numbering, so joiners line up with the
# others); the attempt changes at each retry: every attempt is a distinct op.
STEP_BITS = 32
# Failures that re-running over the survivors can fix.
_RETRYABLE = (FailureKind.PEER_LOST, FailureKind.PEER_LEFT)
# The data-plane calls, and the bits of the engine tag that keep their steps apart.
KIND_SHIFT = 32
CALL_KINDS = {"all_reduce": 0, "all_gather": 1, "reduce_scatter": 2, "broadcast": 3, "all_to_all": 4}
# How a call names itself in errors.
_CALL_TEXT = {"all_reduce": "all-reduce", "all_gather": "all-gather", "reduce_scatter": "reduce-scatter",
              "broadcast": "broadcast", "all_to_all": "all-to-all"}


@dataclass(frozen=True)
class Attempt:
    """The attempt of a collective that succeeded."""

    key: OpKey  # (epoch, engine tag, engine seq)
    handle: Any  # its engine handle (settled)
    world: int  # participants
    attempts: int  # 1 unless it was retried over the survivors


# Starts one attempt on the engine: (epoch, engine seq, deadline) -> engine handle.
StartAttempt = Callable[[int, int, float], Any]


class AttemptCalls:
    def _number(self: PeerCore, call: str, tag: int | None) -> tuple[int, int, int]:
        """Checks `tag` and numbers the next step of `call` on it, the same on every peer
        (call order): returns (user tag, engine tag, seq)."""
        self._require()
        self._catch_up_round()
        self._fresh = False
        tag = 0 if tag is None else int(tag)
        if not 0 <= tag < 2**KIND_SHIFT:
            raise InvalidArgument(f"tag must be in [0, 2**{KIND_SHIFT})")
        engine_tag = tag | CALL_KINDS[call] << KIND_SHIFT
        with self._seq_lock:
            step = self._next_seq.get(engine_tag, 0)
            self._next_seq[engine_tag] = step + 1
            seq = (self._round << STEP_BITS) | step
        return tag, engine_tag, seq

    def _run_attempts(
        self: PeerCore,
        call: str,
        tag: int,
        engine_tag: int,
        seq: int,
        start: StartAttempt,
        desc: Callable[[], str],
        deadline: float,
        retry: bool,
        *,
        blocking: bool = False,
        attempt_key: list[OpKey] | None = None,
        precheck: Callable[[int], None] | None = None,
    ) -> Attempt:
        """Runs (and with `retry` re-runs) one step of `call`; `start` starts each attempt
        on the engine. `blocking`: the caller's thread waits in it (reported to the
        master if it waits long: mismatch detection); `attempt_key` receives the key of
        each attempt. `precheck(epoch)` may refuse an attempt before it starts, by an
        error every peer raises alike (it may read only what every peer of the epoch
        shares: its ring). Raises the agreed failure (typed, naming peer, epoch, tag,
        step)."""
        control = self._require()
        failures_in_epoch: dict[int, int] = {}  # a retry in the same epoch needs a fresh key
        attempts = 0
        while True:
            handle = None
            outcome: protocol.Message | None = None
            superseded = mismatched = False  # this peer aborted the attempt: the master moved on / found a mismatch
            ok, kind, msg, culprit = True, "", "", -1
            self._end_warmup()
            epoch = self._ensure_ring(deadline)  # no ring to run on (evicted, closed, timed out): raises
            if precheck is not None:
                precheck(epoch)
            try:
                key = (epoch, engine_tag, (seq << ATTEMPT_BITS) | failures_in_epoch.get(epoch, 0))
                handle = start(epoch, key[2], deadline)
                self._track(key, handle, retry, desc)
                if attempt_key is not None:
                    attempt_key.append(key)
                try:
                    if blocking:
                        # Tell the master what this caller waits on, and again every
                        # heartbeat interval (a restarted master must hear it too).
                        wait = self.config.blocked_report_after
                        if self._joiners_wait:  # just admitted peers wait for it (Communicator)
                            self._joiners_wait, wait = False, 0.0
                        while not handle.wait(wait):
                            self._report_blocked(call, key)
                            wait = self.config.heartbeat_interval
                    handle.result()
                finally:
                    superseded, mismatched = self._untrack(key)
            except PcclError as exc:
                key = (epoch, engine_tag, (seq << ATTEMPT_BITS) | failures_in_epoch.get(epoch, 0))
                # After voting, this peer held the whole result and another may have
                # committed it: it reports ok and the master settles the op (one
                # commit anywhere makes it a success). Before voting: a failure, and
                # provably nobody committed.
                ok = handle is not None and handle.voted
                kind = failure_kind(exc)
                if kind == FailureKind.ABORTED and mismatched:
                    kind = FailureKind.COLLECTIVE_MISMATCH  # the master found the members out of step
                elif kind == FailureKind.ABORTED and superseded:
                    kind = FailureKind.PEER_LOST  # the master moved on: a consequence, not a cause
                text = self._session.mismatch_text() if kind == FailureKind.COLLECTIVE_MISMATCH else str(exc)
                kind, msg = (FailureKind.NONE, "") if ok else (kind, text)
                culprit = exc.peer if isinstance(exc.peer, int) and exc.peer < 2**63 else -1
            else:
                # Committed: the vote came round, every participant holds the result.
                # No master round trip; the master hears of it in the next "done" batch.
                world = len(self._rings.get(key[0], ()))
                control.note_committed(key, world)
                outcome = {"ok": True, "world": world}
            if outcome is None:
                outcome = self._outcome(key, ok, kind, msg, culprit, deadline)
            attempts += 1
            if outcome["ok"]:
                if handle is not None:
                    handle.settle(True)
                self._events.emit(
                    "op", epoch=key[0], tag=key[1], seq=key[2], ok=True, world=outcome["world"], ring=self.ring_of(key[0])
                )
                return Attempt(key=key, handle=handle, world=outcome["world"], attempts=attempts)
            if handle is not None:
                handle.settle(False)
            self._events.emit(
                "op", epoch=key[0], tag=key[1], seq=key[2], ok=False, kind=outcome["kind"], ring=self.ring_of(key[0])
            )
            error = error_class(outcome["kind"])(
                f"{_CALL_TEXT[call]} failed: {outcome['msg']}",
                peer=outcome["peer"] if outcome["peer"] >= 0 else None,
                epoch=key[0],
                tag=tag,
                step=seq & ((1 << STEP_BITS) - 1),
            )
            if outcome["kind"] == FailureKind.COLLECTIVE_MISMATCH:
                self._start_round()  # every member does: numbering restarts where the master says
            retryable = outcome["kind"] == FailureKind.PEER_LEFT or (retry and outcome["kind"] in _RETRYABLE)
            failures_in_epoch[key[0]] = failures_in_epoch.get(key[0], 0) + 1
            if not retryable or attempts >= self.config.max_retries or failures_in_epoch[key[0]] >= 1 << ATTEMPT_BITS:
                raise error
            # Re-run once the master's new ring (if the failure made one) is known here.
            next_epoch = outcome["next_epoch"]
            self._session.wait(
                functools.partial(self._session.epoch_reached, next_epoch),
                deadline,
                f"epoch {next_epoch}",
            )

    def _outcome(self: PeerCore, key: OpKey, ok: bool, kind: str, msg: str, culprit: int, deadline: float) -> protocol.Message:
        """Reports this peer's result for op `key` and returns the master's decision."""
        control = self._require()
        session = self._session
        control.flush_committed()  # the master weighs this report against those
        known = session.note_reported(key, ok, kind, msg[:2000])  # handed to a restarted master
        try:
            if not known:
                control.send(
                    protocol.make(
                        "op", epoch=key[0], tag=key[1], seq=key[2], ok=ok, kind=kind, msg=msg[:2000], peer=culprit
                    )
                )
            return session.wait(lambda: session.take_outcome(key), deadline, f"the outcome of op {key}")
        finally:
            session.forget_reported(key)

    def _track(self: PeerCore, key: OpKey, handle: Any, retry: bool, desc: Callable[[], str]) -> None:
        if self._session.track(key, handle, retry, desc):
            handle.abort("the master already failed this op (superseded)")

    def _untrack(self: PeerCore, key: OpKey) -> tuple[bool, bool]:
        """Forgets op `key`; returns whether this peer aborted it as superseded, and
        whether because of a mismatch."""
        return self._session.untrack(key)


def remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
