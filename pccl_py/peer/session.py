"""A peer's session with the master: everything the peer knows of the master and of
its own collectives in flight, behind one lock, with one owner.

The control channel (pccl_py.control) feeds it what the master says (record());
the Communicator's calls change and read it through the methods below and wait on
it (wait()). Nothing else touches this state: no public fields.

What it holds:
- from the master: the welcome, the topology and its round, completed votes,
  op outcomes, pending_peers() answers, the sync plan and result, probe tasks,
  eviction, mismatch verdicts, the authentication exchange;
- of this peer: data-plane ops in flight (handles, to abort when the master gives
  up on them), ops committed but not yet reported, ops reported without a verdict,
  the collective request a caller still waits on and what it waits in (a restarted
  master is told), the last synced revision.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pccl_py.errors import Aborted, CollectiveMismatch, FailureKind, Partitioned, Timeout
from pccl_py.wire import protocol

T = TypeVar("T")
OpKey = tuple[int, int, int]
_MAX_KEPT_OUTCOMES = 4096
_MAX_DONE_BATCH = 1024  # committed ops per "done" message; a fuller batch goes at once


@dataclass(frozen=True)
class Topology:
    epoch: int
    ring: tuple[tuple[int, str, int], ...]  # (peer id, host, port) in ring order
    reason: str
    rsag: bool = True  # larger all-reduces may use the direct reduce-scatter + all-gather

    def rank_of(self, peer_id: int) -> int | None:
        for i, (pid, _, _) in enumerate(self.ring):
            if pid == peer_id:
                return i
        return None


@dataclass
class Reaction:
    """What the control channel does after a master message was recorded (outside the
    lock): abort these data-plane handles, send this request again, rejoin a new
    master incarnation."""

    abort: list[Any] = field(default_factory=list)
    # The ring of the epoch that superseded the aborted ops (a "topology"): connections
    # to its peers that hold nothing of them stay open, warm, for it (Engine::failOp).
    keep_idle_to: list[int] = field(default_factory=list)
    resend: protocol.Message | None = None
    rejoin: bool = False
    # A join ahead (Config.prepare_joins): pools to open to these (peer, host, port), in
    # `prepare_epoch` (None: this peer's current one), for a ring of `prepare_sharers`
    # other peers.
    prepare: list[tuple[int, str, int]] = field(default_factory=list)
    prepare_epoch: int | None = None
    prepare_sharers: int = 0


@dataclass(frozen=True)
class RejoinState:
    """A snapshot of what a restarted master needs to take this peer's group over."""

    topology: Topology | None
    round: int
    revision: int | None
    pending: list[list[Any]]  # [[epoch, tag, seq, ok, kind, msg]]: reported, no verdict
    decided: list[list[Any]]  # [[epoch, tag, seq, ok, kind, msg, world]]: verdicts received
    waiting: list[Any]
    answered: list[int]


class Session:
    def __init__(self, peer_id: int, blocked_report_after: float, blocked_report_every: float = 1.0) -> None:
        self._peer_id = peer_id
        self._slow_after = blocked_report_after
        # A wait reports again this often: a restarted master never heard the first report.
        self._slow_every = blocked_report_every
        self._cond = threading.Condition()
        self._closed = False
        # From the master.
        self._welcome: protocol.Message | None = None
        self._topology: Topology | None = None
        self._vote_rounds = 0  # votes completed (topology messages with vote=True)
        self._round = 0  # the group's op-numbering round of the latest admission/vote
        self._outcomes: OrderedDict[OpKey, protocol.Message] = OrderedDict()
        # Outcomes already taken by their op: a second copy (the master answers a report
        # that crossed its push) is dropped.
        self._consumed: OrderedDict[OpKey, None] = OrderedDict()
        self._pending_answers: dict[int, int] = {}
        self._evicted: str | None = None
        self._cut_off = False  # evicted by itself: the master went silent (Partitioned)
        self._sync_plan: protocol.Message | None = None
        self._sync_result: protocol.Message | None = None
        self._probe: protocol.Message | None = None  # the latest probe task (optimize_topology)
        self._last_error: protocol.Message | None = None
        self._mismatches = 0  # "mismatch" verdicts received
        self._mismatch: protocol.Message | None = None
        self._auth_challenge: protocol.Message | None = None
        self._auth_ok = False
        self._recent_verdicts: deque[protocol.Message] = deque(maxlen=1024)
        # Master restart: the request a caller still waits on (sent again once the group
        # re-formed), whether we are re-forming, and the incarnation we rejoin.
        self._outstanding: protocol.Message | None = None
        self._recovering = False
        self._rejoin_target: int | None = None
        # Of this peer.
        self._committed: list[list[int]] = []  # committed through the commit vote, not reported yet
        self._reported: dict[OpKey, tuple[bool, str, str]] = {}  # reported, awaiting a verdict
        # key -> (handle, retry, its shape in words: built only when a report needs it)
        self._inflight: dict[OpKey, tuple[Any, bool, Callable[[], str]]] = {}
        # Ops this peer aborted because the master had moved on (their failure is a
        # consequence, reported as PeerLost, not a cause).
        self._superseded: set[OpKey] = set()
        self._mismatched: set[OpKey] = set()  # aborted because the master found a mismatch
        self._waiting: list[Any] = []  # ["pending", round, index, query], ["vote", round] or []
        self._answered: list[int] = []  # [round, index, count] of the last pending_peers() answer
        self._synced_revision: int | None = None

    # ------------------------------------------------------------------ waiting

    def wait(
        self,
        predicate: Callable[[], T | None],
        deadline: float,
        what: str,
        *,
        mismatches: int | None = None,
        on_slow: Callable[[], None] | None = None,
    ) -> T:
        """Waits until predicate() (evaluated under the lock; it may call this
        session's methods) returns non-None. Raises Timeout at the deadline, Aborted if
        this peer is evicted or closed, and with `mismatches` (the count when the
        collective call began) CollectiveMismatch once the master fails the call as
        mismatched. `on_slow` is called once the wait has lasted blocked_report_after,
        then every blocked_report_every (a restarted master must hear it again)."""
        slow_at = time.monotonic() + self._slow_after if on_slow is not None else None
        with self._cond:
            while True:
                value = predicate()
                if value is not None:
                    return value
                if self._evicted is not None:
                    raise self._eviction_error()
                if self._closed:
                    raise Aborted("the communicator is closed")
                if mismatches is not None and self._mismatches > mismatches:
                    assert self._mismatch is not None
                    raise CollectiveMismatch(self._mismatch["msg"])
                now = time.monotonic()
                remaining = deadline - now
                if remaining <= 0:
                    raise Timeout(f"timed out waiting for {what}")
                if slow_at is not None and now >= slow_at:
                    slow_at = now + self._slow_every
                    assert on_slow is not None
                    on_slow()
                    continue
                self._cond.wait(remaining if slow_at is None else min(remaining, slow_at - now))

    def close(self) -> None:
        """Every wait ends (Aborted)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ------------------------------------------------------------------ what the master said

    def record(self, msg: protocol.Message) -> Reaction:
        """Records a message from the master (the control thread); returns what the
        channel must do about it."""
        kind = msg["t"]
        reaction = Reaction()
        with self._cond:
            if kind == "welcome":
                self._welcome = msg
                if not msg["admitted"] and msg["members"]:  # the ring this newcomer will join
                    reaction.prepare = [(int(p[0]), str(p[1]), int(p[2])) for p in msg["members"]]
                    reaction.prepare_epoch = msg["epoch"]
                    reaction.prepare_sharers = len(msg["members"])
            elif kind == "joining":
                if self._topology is not None:  # the ring's peers and the newcomer
                    reaction.prepare = [(msg["peer"], msg["host"], msg["port"])]
                    reaction.prepare_sharers = len(self._topology.ring)
            elif kind == "unknown":
                reaction.rejoin = self._unknown(msg["master"])
            elif kind == "topology":
                self._on_topology(msg, reaction)
            elif kind == "outcome":
                self._on_outcome(msg, reaction)
            elif kind == "sync_plan":
                self._sync_plan = msg
                self._answered_request("sync")
            elif kind == "sync_result":
                self._sync_result = msg
                self._answered_request("sync", "sync_done")
            elif kind == "probe":
                self._probe = msg
            elif kind == "auth_challenge":
                self._auth_challenge = msg
            elif kind == "auth_ok":
                self._auth_ok = True
            elif kind == "pending_count":
                self._pending_answers[msg["query"]] = msg["count"]
                out = self._outstanding
                if out is not None and out["t"] == "pending" and out["query"] == msg["query"]:
                    self._outstanding = None
            elif kind == "mismatch":
                self._mismatches += 1
                self._mismatch = msg
                self._round = max(self._round, msg["round"])
                self._outstanding = None  # the master dropped the call: nothing to repeat
                named = {(int(k[0]), int(k[1]), int(k[2])) for k in msg["ops"] if len(k) == 3}
                keys = [k for k in self._inflight if k in named]
                self._mismatched.update(keys)
                reaction.abort = self._doom(keys)
            elif kind == "evicted":
                if self._welcome is not None:
                    self._evicted = msg["reason"]
                    reaction.abort = self._doom(list(self._inflight))
            elif kind == "error":
                self._last_error = msg
            self._cond.notify_all()
        return reaction

    def _on_topology(self, msg: protocol.Message, reaction: Reaction) -> None:
        ring = tuple((int(p[0]), str(p[1]), int(p[2])) for p in msg["ring"])
        if self._topology is None or msg["epoch"] >= self._topology.epoch:
            self._topology = Topology(msg["epoch"], ring, msg["reason"], msg["rsag"])
        if self._recovering:
            # The group re-formed under a restarted master: repeat the request a caller
            # still waits on (the old master took it to its grave).
            self._recovering = False
            reaction.resend = self._outstanding
        if msg["vote"]:
            self._vote_rounds += 1
            self._answered_request("vote")
        self._round = max(self._round, msg["round"])
        # Outcomes of long-gone epochs will never be asked for.
        for key in [k for k in self._outcomes if k[0] < msg["epoch"] - 4]:
            del self._outcomes[key]
        reaction.abort = self._doom([k for k in self._inflight if k[0] < msg["epoch"]])
        reaction.keep_idle_to = [int(p[0]) for p in msg["ring"]]

    def _on_outcome(self, msg: protocol.Message, reaction: Reaction) -> None:
        key = (msg["epoch"], msg["tag"], msg["seq"])
        self._recent_verdicts.append(msg)
        if key not in self._consumed:
            self._outcomes[key] = msg
        while len(self._outcomes) > _MAX_KEPT_OUTCOMES:
            self._outcomes.popitem(last=False)
        if msg["ok"]:
            return
        rerun = msg["kind"] == FailureKind.PEER_LEFT  # re-run by every survivor: nothing to doom
        # This op, or the same step started in a newer epoch by a call that will not
        # retry (the peers that failed in the old epoch raise: so must it).
        reaction.abort = self._doom(
            [
                k
                for k, (_, retry, _) in self._inflight.items()
                if k == key or (not retry and not rerun and same_step(k, key) and k[0] > key[0])
            ]
        )

    def _doom(self, keys: list[OpKey]) -> list[Any]:
        self._superseded.update(keys)
        return [self._inflight[k][0] for k in keys]

    def _answered_request(self, *types: str) -> None:
        if self._outstanding is not None and self._outstanding["t"] in types:
            self._outstanding = None  # answered: nothing to repeat

    def _unknown(self, master: int) -> bool:
        """The master does not know us: evicted, if it is the master that welcomed us;
        otherwise it restarted, and we rejoin it (once per incarnation)."""
        if self._welcome is None or self._evicted is not None:
            return False
        if master == self._welcome["master"]:
            self._evicted = "unknown peer: not registered or evicted"
            return False
        if master == self._rejoin_target:
            return False  # already rejoining this one
        self._rejoin_target = master
        self._recovering = True
        return True

    # ------------------------------------------------------------------ membership

    def topology(self) -> Topology | None:
        with self._cond:
            return self._topology

    def welcomed(self) -> bool:
        with self._cond:
            return self._welcome is not None

    def liveness(self) -> tuple[float, float] | None:
        """The master's (heartbeat_interval, heartbeat_timeout), once it welcomed us: a
        peer beats at its pace and gives up on it after its timeout."""
        with self._cond:
            w = self._welcome
            return None if w is None else (float(w["heartbeat_interval"]), float(w["heartbeat_timeout"]))

    def beat_target(self) -> tuple[int, int, bytes] | None:
        """(the master's heartbeat-datagram port, this peer's id, its token) from the
        welcome (pccl_py.wire.beats); None before it or where the master has no port."""
        with self._cond:
            w = self._welcome
            if w is None or not w["beat_port"]:
                return None
            return int(w["beat_port"]), int(w["peer_id"]), bytes(w["beat_token"])

    def evicted(self) -> str | None:
        with self._cond:
            return self._evicted

    def mark_evicted(self, reason: str) -> None:
        with self._cond:
            self._evicted = reason
            self._cond.notify_all()

    def eviction_error(self) -> Aborted | None:
        """The error a call of an evicted peer raises (None while it is a member)."""
        with self._cond:
            return self._eviction_error() if self._evicted is not None else None

    def _eviction_error(self) -> Aborted:
        if self._cut_off:
            return Partitioned(f"this peer is cut off from the group: {self._evicted}")
        return Aborted(f"this peer was evicted by the master: {self._evicted}")

    def cut_off(self, reason: str) -> list[Any]:
        """The master went silent while its connection stayed up: this peer leaves the
        group on its own (the master evicts it within the same bound). Every wait ends
        with Partitioned; returns the data-plane ops in flight, for the caller to abort."""
        with self._cond:
            if self._welcome is None or self._evicted is not None or self._closed:
                return []
            self._evicted = reason
            self._cut_off = True
            self._cond.notify_all()
            return self._doom(list(self._inflight))

    def round(self) -> int:
        with self._cond:
            return self._round

    def vote_rounds(self) -> int:
        with self._cond:
            return self._vote_rounds

    def mismatches(self) -> int:
        with self._cond:
            return self._mismatches

    def mismatch_text(self) -> str:
        """The latest "mismatch" verdict's message (which names each member's call)."""
        with self._cond:
            return self._mismatch["msg"] if self._mismatch is not None else ""

    def epoch_reached(self, epoch: int) -> bool | None:
        """Predicate: the master's topology is at `epoch` or later."""
        with self._cond:
            return True if self._topology is not None and self._topology.epoch >= epoch else None

    def admitted_topology(self) -> Topology | None:
        """Predicate: the topology once it names this peer."""
        with self._cond:
            topo = self._topology
            return topo if topo is not None and topo.rank_of(self._peer_id) is not None else None

    def last_error(self) -> protocol.Message | None:
        with self._cond:
            return self._last_error

    def take_pending_answer(self, query: int) -> int | None:
        with self._cond:
            return self._pending_answers.pop(query, None)

    def recovering(self) -> bool:
        with self._cond:
            return self._recovering

    def rejoin_target(self) -> int | None:
        with self._cond:
            return self._rejoin_target

    def stop_recovering(self) -> None:
        with self._cond:
            self._recovering = False

    # ------------------------------------------------------------------ requests a caller waits on

    def begin_request(self, request: protocol.Message, waiting: list[Any] | None = None) -> int:
        """A collective request is about to be sent: remember it (a restarted master gets
        it again) and, for a restarted master, what the caller waits in. Returns the
        mismatch count to wait with."""
        with self._cond:
            self._outstanding = request
            if waiting is not None:
                self._waiting = waiting
            return self._mismatches

    def end_request(self, request: protocol.Message) -> None:
        with self._cond:
            if self._outstanding is request:
                self._outstanding = None
            self._waiting = []

    def set_answered(self, answered: list[int]) -> None:
        with self._cond:
            self._answered = answered

    def set_synced_revision(self, revision: int) -> None:
        with self._cond:
            self._synced_revision = revision

    # ------------------------------------------------------------------ shared-state sync and probes

    def reset_sync(self) -> None:
        with self._cond:
            self._sync_plan = None
            self._sync_result = None

    def sync_plan_or_result(self) -> protocol.Message | None:
        with self._cond:
            return self._sync_plan or self._sync_result

    def sync_result(self) -> protocol.Message | None:
        with self._cond:
            return self._sync_result

    def reset_probe(self) -> None:
        with self._cond:
            self._probe = None

    def probe_after(self, handled: int) -> protocol.Message | None:
        """The probe task of a round after `handled`, if one arrived."""
        with self._cond:
            task = self._probe
            return task if task is not None and task["round"] > handled else None

    # ------------------------------------------------------------------ authentication

    def reset_auth(self) -> None:
        with self._cond:
            self._auth_challenge, self._auth_ok, self._last_error = None, False, None

    def auth_challenge(self) -> protocol.Message | None:
        with self._cond:
            return self._auth_challenge

    def auth_ok(self) -> bool | None:
        with self._cond:
            return True if self._auth_ok else None

    # ------------------------------------------------------------------ data-plane ops

    def track(self, key: OpKey, handle: Any, retry: bool, desc: Callable[[], str]) -> bool:
        """An op started; returns whether it is already doomed (the master failed it, or
        moved past its epoch, or failed its step for everyone): the caller aborts it."""
        with self._cond:
            self._inflight[key] = (handle, retry, desc)
            decided = self._outcomes.get(key)
            superseded = self._topology is not None and self._topology.epoch > key[0]
            older_failure = not retry and any(
                same_step(k, key) and k[0] < key[0] and not o["ok"] and o["kind"] != FailureKind.PEER_LEFT
                for k, o in self._outcomes.items()
            )
            doomed = (decided is not None and not decided["ok"]) or superseded or older_failure
            if doomed:
                self._superseded.add(key)
            return doomed

    def untrack(self, key: OpKey) -> tuple[bool, bool]:
        """Forgets op `key`; returns whether this peer aborted it as superseded, and
        whether because of a mismatch."""
        with self._cond:
            self._inflight.pop(key, None)
            superseded = key in self._superseded
            mismatched = key in self._mismatched
            self._superseded.discard(key)
            self._mismatched.discard(key)
            return superseded, mismatched

    def inflight(self) -> list[list[Any]]:
        """[[epoch, tag, seq, desc], ...] of the ops in flight ("blocked" reports)."""
        with self._cond:
            return [[k[0], k[1], k[2], d()] for k, (_, _, d) in self._inflight.items()]

    def inflight_desc(self, key: OpKey) -> str | None:
        with self._cond:
            entry = self._inflight.get(key)
            return entry[2]() if entry is not None else None

    def take_outcome(self, key: OpKey) -> protocol.Message | None:
        """Removes and returns the outcome of `key` if known."""
        with self._cond:
            msg = self._outcomes.pop(key, None)
            if msg is not None:
                self._consumed[key] = None
                while len(self._consumed) > _MAX_KEPT_OUTCOMES:
                    self._consumed.popitem(last=False)
            return msg

    def note_reported(self, key: OpKey, ok: bool, kind: str, msg: str) -> bool:
        """This peer reports op `key`; returns whether its outcome is known already."""
        with self._cond:
            self._reported[key] = (ok, kind, msg)
            return key in self._outcomes

    def forget_reported(self, key: OpKey) -> None:
        with self._cond:
            self._reported.pop(key, None)

    def note_committed(self, key: OpKey, world: int) -> bool:
        """Op `key` committed through the commit vote: it joins the next "done" batch
        and the verdicts a restarted master is told about. Returns whether the batch is
        full (send it now)."""
        with self._cond:
            self._committed.append([key[0], key[1], key[2]])
            self._recent_verdicts.append(
                {"epoch": key[0], "tag": key[1], "seq": key[2], "ok": True, "kind": "", "msg": "", "world": world}
            )
            return len(self._committed) >= _MAX_DONE_BATCH

    def take_committed(self) -> list[list[int]]:
        """The committed ops not reported yet (empty until welcomed)."""
        with self._cond:
            if self._welcome is None:
                return []
            batch, self._committed = self._committed, []
            return batch

    def has_committed(self) -> bool:
        with self._cond:
            return bool(self._committed)

    # ------------------------------------------------------------------ master restart

    def rejoin_state(self) -> RejoinState:
        with self._cond:
            return RejoinState(
                topology=self._topology,
                round=self._round,
                revision=self._synced_revision,
                pending=[[k[0], k[1], k[2], ok, kind, msg] for k, (ok, kind, msg) in self._reported.items()],
                decided=[
                    [m["epoch"], m["tag"], m["seq"], m["ok"], m["kind"], m["msg"], m["world"]]
                    for m in list(self._recent_verdicts)[-256:]
                ],
                waiting=list(self._waiting),
                answered=list(self._answered),
            )


def same_step(a: OpKey, b: OpKey) -> bool:
    """Same tag and step (round included), whatever the epoch and attempt."""
    return a[1] == b[1] and a[2] >> ATTEMPT_BITS == b[2] >> ATTEMPT_BITS


# Engine step = round << 40 | step << 8 | attempt (pccl_py.communicator numbers them).
ATTEMPT_BITS = 8
