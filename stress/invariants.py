"""The churn harness's invariants, checked from structured event records only.

`check(records, faults, params)` is a pure function: `records` are the JSON objects
the peers wrote (pccl_py.events / stress.peer), `faults` the orchestrator's own log of
what it did and when, `params` the thresholds. It returns the violations, each a dict
with "invariant" and the details needed to debug it, and the counts for the summary.

Invariants:
- outcome_agreement: for every op attempt (epoch, tag, seq) all participants that
  reported it report the same outcome (ok, or the same failure kind); and no call
  (epoch, tag, step) ends ok on one peer and, for good, failed on another.
- correctness: every successful all-reduce equals the exact sum of the contributions
  of the peers it names as contributors (stress.peer.contribution).
- bit_parity: all peers that completed a sync at revision r of one group life (a group
  founded afresh after all its members were gone starts again, and so does one whose
  restarted master heard no revision from any peer) report the same hash of their
  whole state.
- liveness: every collective a process began ends (unless the process was killed),
  within its timeout plus slack plus the time the process was stopped; and while at
  least 2 peers are alive the group completes an all-reduce in every window of W s.
- hygiene is checked by the orchestrator (processes and ports), not from events.
"""

from __future__ import annotations

import bisect
import itertools
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from stress.peer import digest, expected_sum

Record = dict[str, Any]


@dataclass(frozen=True)
class Params:
    op_timeout: float = 30.0
    slack: float = 5.0  # on top of the op timeout: scheduling on a loaded machine
    window: float = 15.0  # W: the group completes an all-reduce in every window this long
    recovery: float = 8.0  # after a master restart, an all-reduce succeeds within this long
    max_expected: int = 64  # correctness: recompute at most this many distinct results


def check(records: Iterable[Record], faults: list[Record], params: Params) -> tuple[list[Record], Record]:
    records = list(records)
    violations: list[Record] = []
    violations += _outcome_agreement(records)
    violations += _correctness(records, params)
    violations += _bit_parity(records)
    violations += _unresolved(records, faults, params)
    violations += _progress_windows(records, faults, params)
    violations += _master_recovery(records, faults, params)
    return violations, _counts(records)


# ---------------------------------------------------------------------- outcomes


def _outcome_agreement(records: list[Record]) -> list[Record]:
    """From the Communicator's per-attempt "op" records, and the harness's "end"
    records of all-reduces (per (tag, step, epoch) as the final word of each call)."""
    # Keyed by the epoch's ring too: a group founded afresh (by a master that no member
    # came back to) numbers its epochs and ops from the start again.
    by_key: dict[tuple[Any, ...], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("event") == "op":
            verdict = "ok" if r["ok"] else f"failed:{r.get('kind', '')}"
            ring = tuple(sorted(r.get("ring") or ()))
            by_key[(r["epoch"], r["tag"], r["seq"], ring)][verdict].append(r["pid"])
    out = []
    for key, verdicts in by_key.items():
        if len(verdicts) > 1:
            out.append({"invariant": "outcome_agreement", "op": list(key[:3]), "ring": list(key[3]),
                        "verdicts": dict(verdicts)})
    # The harness's view: a call that ended ok in epoch e must not have ended failed on
    # another participant of e that also reached the end of the call. A peer's word on
    # a call is its last: after a CollectiveMismatch the whole group retries the same
    # step in the same epoch (the op records above check each attempt on its own).
    final: dict[tuple[Any, ...], dict[int, str]] = defaultdict(dict)
    for r in records:
        if r.get("event") == "end" and r.get("what") == "allreduce" and r.get("epoch") is not None:
            verdict = "ok" if r["ok"] else f"failed:{r.get('kind', '')}"
            ring = tuple(sorted((r.get("contributors") if r["ok"] else r.get("ring")) or r.get("contributors") or ()))
            final[(r["epoch"], r["tag"], r["step"], ring)][r["pid"]] = verdict
    calls: dict[tuple[Any, ...], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for key, by_pid in final.items():
        for pid, verdict in by_pid.items():
            calls[key][verdict].append(pid)
    for key, verdicts in calls.items():
        if "ok" in verdicts and len(verdicts) > 1:
            out.append({"invariant": "outcome_agreement", "call": list(key[:3]), "ring": list(key[3]),
                        "verdicts": dict(verdicts)})
    return out


def _correctness(records: list[Record], params: Params) -> list[Record]:
    out = []
    cache: dict[tuple[Any, ...], str] = {}
    for r in records:
        if r.get("event") != "end" or r.get("what") != "allreduce" or not r["ok"]:
            continue
        contributors = sorted(r.get("contributors") or [])
        if not contributors:
            out.append({"invariant": "correctness", "pid": r["pid"], "tag": r["tag"], "step": r["step"],
                        "detail": "a successful all-reduce named no contributors"})
            continue
        key = (tuple(contributors), r["tag"], r["step"], r["elements"])
        if key not in cache:
            cache[key] = digest(expected_sum(contributors, r["tag"], r["step"], r["elements"]))
        if cache[key] != r["digest"]:
            out.append({"invariant": "correctness", "pid": r["pid"], "tag": r["tag"], "step": r["step"],
                        "epoch": r.get("epoch"), "contributors": contributors,
                        "expected": cache[key], "got": r["digest"]})
    return out


def _lives(records: list[Record]) -> list[float]:
    """When each group life after the first begins. When every member is gone (and the
    master with them), a group founded afresh starts again at epoch 1 and revision 0
    with another state: the master's "epoch" record of epoch 1. And when the master
    restarts and none of the peers that rejoin it has synced (the state's holders died
    with it: a joiner admitted just before), it numbers revisions from 0 again, with
    the survivors' state: a master "sync" record of a lower revision than the one
    before it."""
    starts = [r["ts"] for r in records if r.get("event") == "epoch" and r.get("epoch") == 1 and "ts" in r]
    syncs = sorted(  # the syncs that set a revision (a failed one says why instead)
        (r for r in records if r.get("source") == "master" and r.get("event") == "sync" and "ts" in r
         and "revision" in r),
        key=lambda r: r["ts"],
    )
    starts += [now["ts"] for before, now in itertools.pairwise(syncs) if now["revision"] < before["revision"]]
    return sorted(starts)


def _bit_parity(records: list[Record]) -> list[Record]:
    # Per group life (_lives): each numbers its revisions from 0.
    lives = _lives(records)
    by_revision: dict[tuple[int, int], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("event") == "synced":
            life = bisect.bisect_right(lives, r.get("ts", 0.0))
            by_revision[(life, r["revision"])][r["hash"]].append(r["pid"])
    return [
        {"invariant": "bit_parity", "revision": rev, "group_life": life, "hashes": dict(hashes)}
        for (life, rev), hashes in sorted(by_revision.items())
        if len(hashes) > 1
    ]


# ---------------------------------------------------------------------- liveness


def _stopped_seconds(faults: list[Record], pid: int, t0: float, t1: float) -> float:
    """Seconds process `pid` spent SIGSTOPped within [t0, t1]."""
    total = 0.0
    for f in faults:
        if f["kind"] == "stall" and f["pid"] == pid:
            a, b = max(t0, f["ts"]), min(t1, f["ts"] + f["seconds"])
            total += max(0.0, b - a)
    return total


def master_outages(faults: list[Record]) -> list[tuple[float, float]]:
    """[kill, restart] of every master restart the orchestrator made."""
    out = []
    down = None
    for f in sorted(faults, key=lambda f: f["ts"]):
        if f["kind"] == "master_kill":
            down = f["ts"]
        elif f["kind"] == "master_start" and down is not None:
            out.append((down, f["ts"]))
            down = None
    return out


def _overlap(a: float, b: float, spans: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(b, y) - max(a, x)) for x, y in spans)


def _unresolved(records: list[Record], faults: list[Record], params: Params) -> list[Record]:
    begun: dict[tuple[int, int], Record] = {}
    out = []
    killed_at = {f["pid"]: f["ts"] for f in faults if f["kind"] in ("kill", "restart")}
    outages = master_outages(faults)
    for r in records:
        if r.get("event") == "begin":
            begun[(r["pid"], r["id"])] = r
        elif r.get("event") == "end":
            start = begun.pop((r["pid"], r["id"]), None)
            if start is None:
                continue
            took = r["ts"] - start["ts"]
            allowed = params.op_timeout + params.slack + _stopped_seconds(faults, r["pid"], start["ts"], r["ts"])
            if _overlap(start["ts"], r["ts"], outages):
                # Waiting out a master restart: the outage, plus the group's re-forming.
                allowed += _overlap(start["ts"], r["ts"], outages) + params.window
            if took > allowed:
                out.append({"invariant": "liveness", "pid": r["pid"], "what": r["what"], "tag": r.get("tag"),
                            "step": r.get("step"), "seconds": round(took, 3), "allowed": round(allowed, 3)})
    for (pid, _), start in begun.items():
        if pid in killed_at and killed_at[pid] >= start["ts"]:
            continue  # the process died with it
        out.append({"invariant": "liveness", "pid": pid, "what": start["what"], "tag": start.get("tag"),
                    "step": start.get("step"), "detail": "began and never ended"})
    return out


def alive_intervals(records: list[Record], faults: list[Record]) -> list[tuple[float, int]]:
    """(time, peers alive from then on): admitted (connected, not yet evicted or gone)
    and not stopped, from the peers' connected/evicted/leaving records and the
    orchestrator's kills, stalls and resumes."""
    changes: list[tuple[float, int, str]] = []  # (ts, pid, what)
    for r in records:
        if r.get("event") in ("connected", "evicted", "leaving"):
            changes.append((r["ts"], r["pid"], r["event"]))
    for f in faults:
        if f["kind"] in ("kill", "restart"):
            changes.append((f["ts"], f["pid"], "dead"))
        elif f["kind"] == "stall":
            changes.append((f["ts"], f["pid"], "stop"))
            changes.append((f["ts"] + f["seconds"], f["pid"], "cont"))
        elif f["kind"] == "leave":
            changes.append((f["ts"], f["pid"], "leaving"))
    changes.sort()
    member: set[int] = set()
    stopped: set[int] = set()
    dead: set[int] = set()
    series = []
    for ts, pid, what in changes:
        if what == "connected" and pid not in dead:
            member.add(pid)
        elif what in ("evicted", "leaving", "dead"):
            member.discard(pid)
            if what == "dead":
                dead.add(pid)
        elif what == "stop":
            stopped.add(pid)
        elif what == "cont":
            stopped.discard(pid)
        series.append((ts, len(member - stopped)))
    return series


def _progress_windows(records: list[Record], faults: list[Record], params: Params) -> list[Record]:
    series = alive_intervals(records, faults)
    run_end = max((f["ts"] for f in faults if f["kind"] == "run_end"), default=None)
    if not series or run_end is None:
        return []
    oks = sorted(r["ts"] for r in records if r.get("event") == "end" and r.get("what") == "allreduce" and r["ok"])
    # Maximal intervals with >= 2 alive.
    intervals = []
    start = None
    for ts, alive in series:
        if alive >= 2 and start is None:
            start = ts
        elif alive < 2 and start is not None:
            intervals.append((start, ts))
            start = None
    if start is not None:
        intervals.append((start, run_end))
    # The master's outages are not windows the group can progress in (ops need its
    # verdicts); the window after each restart covers the group's re-forming.
    for x, y in master_outages(faults):
        split = []
        for a, b in intervals:
            if y <= a or x >= b:
                split.append((a, b))
                continue
            if a < x:
                split.append((a, x))
            if y < b:
                split.append((y, b))
        intervals = split
    out = []
    for a, b in intervals:
        points = [a] + [t for t in oks if a <= t <= b] + [b]
        for p, q in zip(points, points[1:]):
            if q - p > params.window:
                out.append({"invariant": "liveness", "detail": "no all-reduce completed in a window",
                            "from": round(p, 3), "to": round(q, 3), "window": params.window})
    return out


def _master_recovery(records: list[Record], faults: list[Record], params: Params) -> list[Record]:
    """After each master restart that the master survived for `recovery` seconds while
    at least 2 peers were alive, the group completed an all-reduce within that time."""
    oks = sorted(r["ts"] for r in records if r.get("event") == "end" and r.get("what") == "allreduce" and r["ok"])
    series = alive_intervals(records, faults)
    kills = sorted(f["ts"] for f in faults if f["kind"] == "master_kill")
    run_end = max((f["ts"] for f in faults if f["kind"] == "run_end"), default=float("inf"))
    out = []
    for _, restarted in master_outages(faults):
        until = restarted + params.recovery
        next_kill = min([k for k in kills if k > restarted], default=float("inf"))
        if until > min(next_kill, run_end):
            continue
        before = [n for t, n in series if t <= restarted]
        alive = before[-1] if before else 0
        if alive < 2 or any(n < 2 for t, n in series if restarted <= t <= until):
            continue
        if not any(restarted < t <= until for t in oks):
            out.append({"invariant": "liveness", "detail": "no all-reduce succeeded after a master restart",
                        "restarted": round(restarted, 3), "within": params.recovery})
    return out


# ---------------------------------------------------------------------- counts


def _counts(records: list[Record]) -> Record:
    ends = [r for r in records if r.get("event") == "end"]
    ar = [r for r in ends if r["what"] == "allreduce"]
    syncs = [r for r in ends if r["what"] == "sync"]
    return {
        "allreduce_calls": len(ar),
        "allreduce_ok": sum(1 for r in ar if r["ok"]),
        "allreduce_failed": sum(1 for r in ar if not r["ok"]),
        "op_attempts": sum(1 for r in records if r.get("event") == "op"),
        "op_attempts_failed": sum(1 for r in records if r.get("event") == "op" and not r["ok"]),
        "retried_calls": sum(1 for r in ar if r["ok"] and r.get("attempts", 1) > 1),
        "syncs": len(syncs),
        "syncs_ok": sum(1 for r in syncs if r["ok"]),
        "revisions_synced": len({r["revision"] for r in records if r.get("event") == "synced"}),
        "state_bytes_received": sum(r.get("rx_bytes", 0) for r in syncs if r["ok"]),
        "allreduce_bytes_sent": sum(r.get("tx_bytes", 0) for r in ar if r["ok"]),
        "bytes_moved": sum(r.get("tx_bytes", 0) for r in ends if r["ok"]),
        "connects": sum(1 for r in records if r.get("event") == "connected"),
        "evictions_seen": sum(1 for r in records if r.get("event") == "evicted"),
        "graceful_leaves": sum(1 for r in records if r.get("event") == "leaving"),
    }
