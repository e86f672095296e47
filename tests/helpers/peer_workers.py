"""Peer processes for the multi-process Communicator tests (tests/test_communicator.py,
tests/test_failures.py). They must live in an importable module: pccl_py.testing's
PeerGroup starts them with multiprocessing's 'spawn' method.

Every worker has the PeerGroup signature `target(master, index, out, **kwargs)` but
reports its plain-dict records through its own pipe (`records`, a Connection), not
through the queue `out` that PeerGroup shares among all peers: a peer SIGKILLed or
SIGSTOPped while it holds that shared queue's lock would silence every other peer.
The test process runs the master and asserts on the records.

Two kinds of worker:

- `scripted_worker`: connects, then executes commands the test sends through its own
  command queue (`commands`), one record per command: {"index", "id", "cmd", "ok", ...}.
  The test decides what every peer does and when, so it can kill or stop a peer
  between (or during) precisely chosen calls.
- `loop_worker`: runs back-to-back all-reduces on its own (so a kill or stop lands in
  the middle of one), one record per op, and stops once the group has shrunk.

Inputs are deterministic (`make_input`), so the test recomputes the exact expected
result of any set of contributors and compares checksums of the bytes.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
import traceback
import zlib
from collections.abc import Iterator
from typing import Any, Self

import numpy as np

import pccl_py as pccl
from pccl_py.testing import join_group

# Small integers only: every sum the tests make is exact in float32 and bfloat16.
_PATTERN_PERIOD = 7


def make_input(n: int, coef: float, dtype: str = "float32") -> np.ndarray:
    """Deterministic input: (i % 7 + 1) * coef, as numpy `dtype` (not bfloat16)."""
    base = (np.arange(n, dtype=np.int64) % _PATTERN_PERIOD + 1).astype(np.float64)
    return (base * coef).astype(dtype)


def checksum(x: Any) -> int:
    """CRC32 of the raw bytes of a numpy array or torch CPU tensor."""
    if type(x).__module__.startswith("torch"):
        import torch

        t = x.detach().contiguous()
        x = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    return zlib.crc32(memoryview(np.ascontiguousarray(x)).cast("B"))


def _error_fields(exc: BaseException) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "error": type(exc).__name__,
        "message": str(exc)[:2000],
        "pccl_error": isinstance(exc, pccl.PcclError),
    }
    if isinstance(exc, pccl.PcclError):
        fields.update(err_peer=exc.peer, err_epoch=exc.epoch, err_tag=exc.tag, err_step=exc.step)
    else:
        fields["traceback"] = traceback.format_exc()[-3000:]
    return fields


def _state(comm: pccl.Communicator) -> dict[str, Any]:
    return {"world_now": comm.world_size, "epoch_now": comm.epoch, "rank_now": comm.rank}


def _make_tensor(n: int, coef: float, kind: str) -> Any:
    """kind: "numpy:<dtype>" or "torch:<dtype>" (torch float32 / bfloat16 / ...)."""
    lib, _, dtype = kind.partition(":")
    if lib == "numpy":
        return make_input(n, coef, dtype)
    import torch

    return torch.from_numpy(make_input(n, coef, "float32")).to(getattr(torch, dtype))


# ---------------------------------------------------------------------- scripted worker


def _cmd_all_reduce(comm: pccl.Communicator, cmd: dict[str, Any]) -> dict[str, Any]:
    x = _make_tensor(cmd["n"], cmd["coef"], cmd.get("kind", "numpy:float32"))
    before = checksum(x)
    out = None
    if cmd.get("out_of_place"):
        out = x.clone() if hasattr(x, "clone") else x.copy()
        out[...] = 0
    op = pccl.ReduceOp[cmd.get("op", "SUM")]
    rec: dict[str, Any] = {"input_crc": before}
    t0 = time.monotonic()
    try:
        info = comm.all_reduce(
            x,
            op=op,
            out=out,
            tag=cmd.get("tag"),
            timeout=cmd.get("timeout", 30.0),
            retry=cmd.get("retry", False),
        )
    except Exception as exc:  # noqa: BLE001 - reported to the test, whatever it is
        rec.update(
            ok=False, elapsed=time.monotonic() - t0, intact=checksum(x) == before, **_error_fields(exc)
        )
        return rec
    result = x if out is None else out
    rec.update(
        ok=True,
        elapsed=time.monotonic() - t0,
        world=info.world_size,
        epoch=info.epoch,
        attempts=info.attempts,
        crc=checksum(result),
        x_crc=checksum(x),
        head=[float(v) for v in result.reshape(-1)[:4]],
    )
    return rec


def _cmd_async_tags(comm: pccl.Communicator, cmd: dict[str, Any]) -> dict[str, Any]:
    """Starts one all_reduce_async per tag (in the given order), then waits for all."""
    n = cmd["n"]
    xs = {tag: make_input(n, coef) for tag, coef in cmd["tags"]}
    handles = {
        tag: comm.all_reduce_async(xs[tag], tag=tag, timeout=cmd.get("timeout", 30.0))
        for tag, _ in cmd["tags"]
    }
    results: dict[int, Any] = {}
    ok = True
    for tag, handle in handles.items():
        try:
            info = handle.wait(cmd.get("timeout", 30.0) + 5.0)
            results[tag] = {"ok": True, "world": info.world_size, "crc": checksum(xs[tag])}
        except Exception as exc:  # noqa: BLE001 - reported to the test, whatever it is
            ok = False
            results[tag] = {"ok": False, **_error_fields(exc)}
    return {"ok": ok, "results": results}


def _cmd_pending_until(comm: pccl.Communicator, cmd: dict[str, Any]) -> dict[str, Any]:
    """Calls pending_peers() until it answers > 0; reports every answer."""
    deadline = time.monotonic() + cmd.get("timeout", 30.0)
    answers: list[int] = []
    while time.monotonic() < deadline:
        answers.append(comm.pending_peers(timeout=cmd.get("timeout", 30.0)))
        if answers[-1] > 0:
            return {"ok": True, "answers": answers}
        time.sleep(0.02)
    return {"ok": False, "answers": answers, "error": "deadline"}


def _cmd_pending_once(comm: pccl.Communicator, cmd: dict[str, Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        answer = comm.pending_peers(timeout=cmd.get("timeout", 30.0))
    except Exception as exc:  # noqa: BLE001 - reported to the test, whatever it is
        return {"ok": False, "elapsed": time.monotonic() - t0, **_error_fields(exc)}
    return {"ok": True, "elapsed": time.monotonic() - t0, "answer": answer}


def _cmd_update_topology(comm: pccl.Communicator, cmd: dict[str, Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        comm.update_topology(timeout=cmd.get("timeout", 30.0))
    except Exception as exc:  # noqa: BLE001 - reported to the test, whatever it is
        return {"ok": False, "elapsed": time.monotonic() - t0, **_error_fields(exc)}
    return {"ok": True, "elapsed": time.monotonic() - t0}


def _cmd_optimize_topology(comm: pccl.Communicator, cmd: dict[str, Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        comm.optimize_topology(timeout=cmd.get("timeout", 30.0))
    except Exception as exc:  # noqa: BLE001 - reported to the test, whatever it is
        return {"ok": False, "elapsed": time.monotonic() - t0, **_error_fields(exc)}
    return {"ok": True, "elapsed": time.monotonic() - t0}


def _cmd_join(comm: pccl.Communicator, cmd: dict[str, Any]) -> dict[str, Any]:
    join_group(comm, cmd["world"], timeout=cmd.get("timeout", 30.0))
    return {"ok": True}


def _cmd_wait_world(comm: pccl.Communicator, cmd: dict[str, Any]) -> dict[str, Any]:
    """Waits (bounded) until this peer's topology has cmd["world"] peers."""
    deadline = time.monotonic() + cmd.get("timeout", 30.0)
    while comm.world_size != cmd["world"]:
        if time.monotonic() > deadline:
            return {"ok": False, "error": "deadline"}
        time.sleep(0.005)
    return {"ok": True}


def _cmd_sync(comm: pccl.Communicator, cmd: dict[str, Any]) -> dict[str, Any]:
    """sync_shared_state() of a one-entry state make_input(n, coef), at `revision`."""
    state = pccl.SharedState({"w": make_input(cmd.get("n", 1024), cmd.get("coef", 1.0))}, revision=cmd.get("revision", 0))
    t0 = time.monotonic()
    try:
        info = comm.sync_shared_state(state, timeout=cmd.get("timeout", 30.0))
    except Exception as exc:  # noqa: BLE001 - reported to the test, whatever it is
        return {"ok": False, "elapsed": time.monotonic() - t0, **_error_fields(exc)}
    return {"ok": True, "elapsed": time.monotonic() - t0, "revision": info.revision, "crc": checksum(state.tensors["w"])}


def _cmd_gather(comm: pccl.Communicator, cmd: dict[str, Any]) -> dict[str, Any]:
    """all_gather / reduce_scatter / broadcast / all_to_all (cmd["call"]) of
    make_input(n, coef); reports the result's checksum and shape, and whether the input
    was left intact. An all-to-all runs in place with cmd["in_place"] (and never retries)."""
    x = make_input(cmd["n"], cmd["coef"])
    before = checksum(x)
    call = cmd["call"]
    kwargs: dict[str, Any] = {"tag": cmd.get("tag"), "timeout": cmd.get("timeout", 30.0), "retry": cmd.get("retry", False)}
    if call == "all_to_all":
        del kwargs["retry"]
        if cmd.get("in_place"):
            kwargs["out"] = x
    if call == "broadcast":
        kwargs["root"] = cmd.get("root", 0)
    t0 = time.monotonic()
    try:
        info = getattr(comm, call)(x, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported to the test, whatever it is
        return {"ok": False, "elapsed": time.monotonic() - t0, "intact": checksum(x) == before, **_error_fields(exc)}
    return {
        "ok": True,
        "elapsed": time.monotonic() - t0,
        "world": info.world_size,
        "epoch": info.epoch,
        "attempts": info.attempts,
        "rank": info.rank,
        "crc": checksum(info.output),
        "shape": list(info.output.shape),
        "tx": info.tx_bytes,
        "rx": info.rx_bytes,
    }


def _cmd_stats(comm: pccl.Communicator, cmd: dict[str, Any]) -> dict[str, Any]:
    """The engine's connection counters (tests read them; pccl has no public API for it)."""
    engine = comm._engine
    assert engine is not None
    return {"ok": True, "opened": engine.connections_opened, "kept": engine.connections_kept,
            "padding": engine.padding_bytes,
            **_state(comm)}


def _cmd_close(comm: pccl.Communicator, cmd: dict[str, Any]) -> dict[str, Any]:
    comm.close()
    return {"ok": True}


_COMMANDS = {
    "all_reduce": _cmd_all_reduce,
    "async_tags": _cmd_async_tags,
    "pending_until": _cmd_pending_until,
    "pending_once": _cmd_pending_once,
    "update_topology": _cmd_update_topology,
    "optimize_topology": _cmd_optimize_topology,
    "join": _cmd_join,
    "wait_world": _cmd_wait_world,
    "sync": _cmd_sync,
    "gather": _cmd_gather,
    "stats": _cmd_stats,
    "close": _cmd_close,
    "state": lambda comm, cmd: {"ok": True},
}


def scripted_worker(
    master: str,
    index: int,
    out: Any,
    *,
    records: Any,
    commands: Any,
    group: int = 0,
    config: dict[str, Any] | None = None,
    connect_timeout: float = 60.0,
    idle_timeout: float = 120.0,
    preload_torch: bool = False,
) -> None:
    """Connects (reports {"event": "connected"}), then runs commands from `commands`
    until it gets None (or waits `idle_timeout` seconds for one, or its parent dies).
    Each command is a dict {"id", "cmd", ...}; the record echoes "id" and "cmd" and
    adds the peer's world size, epoch and rank after the call."""
    emit = records.send
    if preload_torch:  # seconds of CPU: pay it before the test starts timing anything
        import torch  # noqa: F401
    comm = pccl.Communicator(master, group=group, config=pccl.Config(**(config or {})), name=f"peer-{index}")
    parent = os.getppid()
    try:
        emit({"index": index, "event": "started", "pid": os.getpid(), "peer": comm.peer_id})
        t0 = time.monotonic()
        comm.connect(timeout=connect_timeout)
        emit(
            {
                "index": index,
                "event": "connected",
                "peer": comm.peer_id,
                "connect_s": time.monotonic() - t0,
                **_state(comm),
            }
        )
        idle_since = time.monotonic()
        while True:
            try:
                cmd = commands.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent or time.monotonic() - idle_since > idle_timeout:
                    break
                continue
            if cmd is None:
                break
            if cmd.get("announce"):  # lets the test act while this peer is inside the call
                emit({"index": index, "id": cmd["id"], "phase": "calling", "t": time.time()})
            try:
                rec = _COMMANDS[cmd["cmd"]](comm, cmd)
            except Exception as exc:  # noqa: BLE001 - reported to the test, whatever it is
                rec = {"ok": False, **_error_fields(exc)}
            rec.update(index=index, id=cmd["id"], cmd=cmd["cmd"], t_end=time.time())
            if cmd["cmd"] != "close":
                rec.update(_state(comm))
            emit(rec)
            idle_since = time.monotonic()
        emit({"index": index, "event": "done"})
    except BaseException as exc:
        emit(
            {
                "index": index,
                "event": "crashed",
                **_error_fields(exc),
                "traceback": traceback.format_exc()[-3000:],
            }
        )
        raise
    finally:
        comm.close()


# ---------------------------------------------------------------------- loop worker


def loop_coef(index: int, op: int) -> float:
    """Input coefficient of peer `index` at op `op` (distinct per peer and op)."""
    return float((index + 1) + 10 * op)


def loop_worker(
    master: str,
    index: int,
    out: Any,
    *,
    records: Any,
    world: int,
    elements: int,
    max_ops: int = 200,
    retry: bool = False,
    op_timeout: float = 30.0,
    config: dict[str, Any] | None = None,
) -> None:
    """Connects, waits for `world` peers, reports {"event": "ready"}, then runs
    back-to-back in-place SUM all-reduces (input make_input(elements, loop_coef(index,
    op))), one record per op: {"index", "op", "ok", "world", "epoch", "crc", "intact",
    "error", ...}. Once an op fails or succeeds with fewer than `world` contributors
    it runs one more all_reduce(retry=True) of the same (intact) input, reported with
    "recovery": True, and stops."""
    emit = records.send
    comm = pccl.Communicator(master, config=pccl.Config(**(config or {})), name=f"loop-{index}")
    try:
        comm.connect(timeout=60)
        join_group(comm, world, timeout=60)
        emit({"index": index, "event": "ready", "pid": os.getpid(), "peer": comm.peer_id, **_state(comm)})
        base = make_input(elements, 1.0)  # inputs are base * coef: cheap to make, exact
        x = np.empty_like(base)
        for op in range(max_ops):
            coef = loop_coef(index, op)
            np.multiply(base, coef, out=x)
            rec: dict[str, Any] = {"index": index, "op": op, "n": elements, "t_start": time.time()}
            shrunk = False
            try:
                info = comm.all_reduce(x, retry=retry, timeout=op_timeout)
                rec.update(
                    ok=True, world=info.world_size, epoch=info.epoch, crc=checksum(x), attempts=info.attempts
                )
                shrunk = info.world_size < world
            except Exception as exc:  # noqa: BLE001 - reported to the test, whatever it is
                rec.update(
                    ok=False, intact=bool(np.array_equal(x, base * np.float32(coef))), **_error_fields(exc)
                )
                shrunk = True
            rec.update(t_end=time.time(), **_state(comm))
            emit(rec)
            if not shrunk:
                continue
            if rec["ok"]:  # x holds that op's result; a failed op left x intact: retry it as is
                np.multiply(base, coef, out=x)
            rec = {"index": index, "op": op, "n": elements, "recovery": True, "t_start": time.time()}
            try:
                info = comm.all_reduce(x, retry=True, timeout=op_timeout)
                rec.update(
                    ok=True, world=info.world_size, epoch=info.epoch, crc=checksum(x), attempts=info.attempts
                )
            except Exception as exc:  # noqa: BLE001 - reported to the test, whatever it is
                rec.update(ok=False, **_error_fields(exc))
            rec.update(t_end=time.time(), **_state(comm))
            emit(rec)
            break
        emit({"index": index, "event": "done"})
    except BaseException as exc:
        emit(
            {
                "index": index,
                "event": "crashed",
                **_error_fields(exc),
                "traceback": traceback.format_exc()[-3000:],
            }
        )
        raise
    finally:
        comm.close()


# ---------------------------------------------------------------------- test-side helpers


@contextlib.contextmanager
def master_paused(master: pccl.Master, limit: float = 3.0) -> Iterator[None]:
    """Holds the in-process master's event loop (white box) for the duration of the
    block (at most `limit` seconds, well under the heartbeat timeout): the master
    notices nothing and tells nobody anything meanwhile, like a master that is far away."""
    release, held = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(limit)

    master._loop.call_soon_threadsafe(hold)
    assert held.wait(10), "the master's loop did not pause"
    try:
        yield
    finally:
        release.set()


class Cluster:
    """Test-side driver of peer processes: one PeerGroup (process lifecycle, cleaned up
    by close()), a record pipe per peer and, for scripted peers, a command queue per
    peer. `call({index: command})` sends each peer its command and returns
    {index: record} once every addressed peer has answered (bounded wait)."""

    def __init__(self, master: str, target: Any = None, **kwargs: Any) -> None:
        import multiprocessing as mp

        from pccl_py.testing import PeerGroup

        self._ctx = mp.get_context("spawn")
        self.target = target or scripted_worker
        self.group = PeerGroup(master, self.target, kwargs)
        self.commands: dict[int, Any] = {}
        self.readers: dict[int, Any] = {}
        self.backlog: list[dict[str, Any]] = []  # received, not yet consumed by expect()
        self.history: list[dict[str, Any]] = []  # everything received, in arrival order
        self.signalled: set[int] = set()  # peers this test killed on purpose
        self._next_id = 0

    # process control -------------------------------------------------------------
    def start(self, index: int, **overrides: Any) -> None:
        reader, writer = self._ctx.Pipe(duplex=False)
        self.readers[index] = reader
        if self.target is scripted_worker:
            self.commands[index] = self._ctx.Queue()
            overrides["commands"] = self.commands[index]
        try:
            self.group.start(index, records=writer, **overrides)
        finally:
            writer.close()  # the child holds the only write end: its death reads as EOF

    def kill(self, index: int) -> None:
        self.signalled.add(index)
        self.group.kill(index)
        self.group.processes[index].join(10)

    def stop(self, index: int) -> None:
        self.group.stop(index)

    def resume(self, index: int) -> None:
        self.group.resume(index)

    # records ---------------------------------------------------------------------
    def _receive(self, timeout: float) -> None:
        from multiprocessing.connection import wait

        for reader in wait(list(self.readers.values()), timeout):
            try:
                rec = reader.recv()
            except (EOFError, OSError):  # that peer exited
                self.readers = {i: r for i, r in self.readers.items() if r is not reader}
                continue
            self.backlog.append(rec)
            self.history.append(rec)
        if not self.readers:
            time.sleep(min(timeout, 0.05))

    def _check_peers(self, what: str) -> None:
        crashed = [r for r in self.backlog if r.get("event") == "crashed"]
        if crashed:
            raise AssertionError(f"a peer crashed while waiting for {what}: {crashed}")
        dead = {
            i: p.exitcode
            for i, p in self.group.processes.items()
            if i not in self.signalled and p.exitcode not in (None, 0)
        }
        if dead:
            raise AssertionError(f"peer process(es) died (index: exit code) {dead} while waiting for {what}")

    def expect(self, predicate: Any, timeout: float, what: str = "a record") -> dict[str, Any]:
        """Returns (and consumes) the first record, old or new, satisfying `predicate`.
        Fails fast if a peer reports that it crashed."""
        deadline = time.monotonic() + timeout
        while True:
            for i, rec in enumerate(self.backlog):
                if predicate(rec):
                    return self.backlog.pop(i)
            self._check_peers(what)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}; unconsumed: {self.backlog[-8:]}"
                )
            self._receive(min(remaining, 0.5))

    def collect(self, done: Any, timeout: float, what: str) -> list[dict[str, Any]]:
        """Receives records until done(history) holds; returns the history."""
        deadline = time.monotonic() + timeout
        while not done(self.history):
            self._check_peers(what)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}; last records: {self.history[-6:]}"
                )
            self._receive(min(remaining, 0.5))
        return self.history

    def connected(self, indices: Any, timeout: float = 60.0) -> dict[int, dict[str, Any]]:
        return {
            i: self.expect(
                lambda r, i=i: r.get("index") == i and r.get("event") == "connected",
                timeout,
                f"peer {i} connected",
            )
            for i in indices
        }

    # commands (scripted peers) -----------------------------------------------------
    def send(self, commands: dict[int, dict[str, Any]]) -> int:
        """Sends each peer its command (all with one fresh id); returns the id."""
        self._next_id += 1
        self.send_as(self._next_id, commands)
        return self._next_id

    def send_as(self, cid: int, commands: dict[int, dict[str, Any]]) -> None:
        for index, cmd in commands.items():
            self.commands[index].put({**cmd, "id": cid})

    def results(self, cid: int, indices: Any, timeout: float) -> dict[int, dict[str, Any]]:
        return {
            i: self.expect(
                lambda r, i=i: r.get("index") == i and r.get("id") == cid and "phase" not in r,
                timeout,
                f"peer {i}'s answer to command {cid}",
            )
            for i in indices
        }

    def call(self, commands: dict[int, dict[str, Any]], timeout: float = 60.0) -> dict[int, dict[str, Any]]:
        return self.results(self.send(commands), list(commands), timeout)

    def form(self, indices: Any, timeout: float = 60.0, **overrides: Any) -> dict[int, dict[str, Any]]:
        """Starts scripted peers `indices` (the first one first: it founds the group) and
        has them admit each other until all are in one group; returns their connect
        records."""
        first, *rest = list(indices)
        world = 1 + len(rest)
        self.start(first, **overrides)
        records = self.connected([first], timeout)
        for i in rest:
            self.start(i, **overrides)
        cid = self.send({first: {"cmd": "join", "world": world, "timeout": timeout}})
        waiting = set(rest)
        while waiting:  # a peer answers commands once admitted; it must then help the rest in
            rec = self.expect(
                lambda r: r.get("index") in waiting and r.get("event") == "connected",
                timeout,
                f"peers {waiting} connected",
            )
            waiting.discard(rec["index"])
            records[rec["index"]] = rec
            self.send_as(cid, {rec["index"]: {"cmd": "join", "world": world, "timeout": timeout}})
        joined = self.results(cid, [first, *rest], timeout)
        bad = {i: r for i, r in joined.items() if not r["ok"] or r["world_now"] != world}
        assert not bad, f"group did not form: {bad}"
        return records

    def close(self) -> None:
        for q in self.commands.values():
            try:
                q.put(None)
            except (ValueError, OSError):
                pass
        self.group.close()
        for q in self.commands.values():
            q.cancel_join_thread()
            q.close()
        for r in self.readers.values():
            r.close()
        self.commands.clear()
        self.readers.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
