"""One peer process of the churn harness: a training-like loop that reports what it did
as structured events (JSON lines), so the orchestrator can check the invariants.

Each step: admit waiting peers (update_topology when pending_peers() says so), sync the
shared state, then three all-reduces (one blocking, two async at once), all with
retry=True, and a deterministic update of the state from their results. Inputs are
small integers in float32, so every sum over up to 2**12 peers is exact and the
checker can recompute the expected result from the contributors the op reports.

Events (besides the Communicator's own "op"/"topology"/"sync" records):
  connected {peer, epoch, world}         admitted (first time or after an eviction)
  begin / end {id, what, tag, step}      every collective call; end has ok, kind,
                                          contributors, digest, tx/rx bytes
  synced {peer, revision, hash}          after every successful sync (hash: all bytes)
  evicted {peer, reason}                 the master dropped us; we rejoin as a new peer
  leaving {peer}                         graceful leave (SIGTERM)

Test-only bugs (--bug), to show the harness catches them: "corrupt_after_sync" flips a
byte of the state after a successful sync; "wrong_result" flips a byte of an
all-reduce result before reporting it; "lie_outcome" reports a failed op as ok.

    python -m stress.peer --master 127.0.0.1:PORT --events FILE [--bug KIND]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

import numpy as np
import xxhash

from pccl_py import Communicator, Config, SharedState
from pccl_py.errors import Aborted, PcclError, StateMismatch
from pccl_py.events import EventLog

BUGS = ("corrupt_after_sync", "wrong_result", "lie_outcome")
# (tag, elements, async): the all-reduces of one step.
OPS = ((0, 1 << 14, False), (1, 1 << 16, True), (2, 1 << 18, True))
STATE_ELEMENTS = 1 << 12
BLOB_ELEMENTS = 1 << 20  # 4 MiB that a joiner must receive


PERIOD = 4096  # inputs repeat with this period, so sums can be checked on one period


def contribution(peer: int, tag: int, step: int, elements: int) -> np.ndarray:
    """The input of `peer` for op (tag, step): integers in [0, 4096) as float32."""
    base = (peer % 65521) * 3 + step * 7 + tag * 13
    return ((np.arange(elements, dtype=np.int64) + base) % PERIOD).astype(np.float32)


def expected_sum(peers: list[int], tag: int, step: int, elements: int) -> np.ndarray:
    """The exact SUM of the peers' contributions (float32 holds every partial sum of up
    to 4096 peers exactly). Computed on one period and tiled: the checker runs this for
    every distinct op of a long run."""
    period = np.zeros(PERIOD, dtype=np.float64)
    for p in peers:
        period += contribution(p, tag, step, PERIOD)
    reps = -(-elements // PERIOD)
    return np.tile(period.astype(np.float32), reps)[:elements]


def digest(array: np.ndarray) -> str:
    return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(array).view(np.uint8))


def state_digest(state: SharedState) -> str:
    h = xxhash.xxh3_64()
    for buf in state.buffers():
        h.update(buf)
    return h.hexdigest()


class Peer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config = Config(
            heartbeat_interval=args.heartbeat_interval,
            heartbeat_timeout=args.heartbeat_timeout,
            op_timeout=args.op_timeout,
            connect_timeout=args.op_timeout,
            event_log=args.events,
        )
        self.events = EventLog(args.events, f"stress-{args.index}")
        self.stop = False
        self.next_id = 0
        self.comm: Communicator | None = None
        self.state = SharedState(
            {
                "w": np.zeros(STATE_ELEMENTS, dtype=np.float64),
                "step": np.zeros(1, dtype=np.int64),
                "blob": np.zeros(BLOB_ELEMENTS, dtype=np.float32),
            }
        )
        self.syncs = 0

    def emit(self, event: str, **fields: Any) -> None:
        self.events.emit(event, index=self.args.index, **fields)

    # ------------------------------------------------------------------ membership

    def join(self) -> Communicator:
        while True:
            comm = Communicator(self.args.master, host=self.args.host, config=self.config,
                                name=f"stress-{self.args.index}")
            try:
                comm.connect()
            except PcclError as exc:
                comm.close()
                self.emit("join_failed", error=f"{type(exc).__name__}: {exc}")
                if self.stop:
                    raise
                time.sleep(0.2)
                continue
            self.emit("connected", peer=comm.peer_id, epoch=comm.epoch, world=comm.world_size)
            return comm

    def rejoin(self, reason: str) -> None:
        assert self.comm is not None
        self.emit("evicted", peer=self.comm.peer_id, reason=reason)
        self.comm.close()
        self.comm = self.join()

    # ------------------------------------------------------------------ one step

    def begin(self, what: str, tag: int, step: int) -> int:
        self.next_id += 1
        self.emit("begin", id=self.next_id, what=what, tag=tag, step=step)
        return self.next_id

    def sync(self) -> bool:
        comm = self.comm
        assert comm is not None
        step = int(self.state.tensors["step"][0])
        op_id = self.begin("sync", -1, step)
        try:
            info = comm.sync_shared_state(self.state)
        except PcclError as exc:
            self.emit("end", id=op_id, what="sync", ok=False, kind=type(exc).__name__, msg=str(exc)[:300])
            raise
        self.syncs += 1
        if self.args.bug == "corrupt_after_sync" and self.syncs % 3 == 0:
            self.state.tensors["w"].view(np.uint8)[5] ^= 0x40
        self.emit("end", id=op_id, what="sync", ok=True, rx_bytes=info.rx_bytes, tx_bytes=info.tx_bytes)
        self.emit(
            "synced",
            peer=comm.peer_id,
            revision=self.state.revision,
            step=int(self.state.tensors["step"][0]),
            hash=state_digest(self.state),
            epoch=comm.epoch,
            world=comm.world_size,
        )
        return True

    def finish(self, op_id: int, tag: int, step: int, result: np.ndarray, info: Any) -> None:
        reported = result
        if self.args.bug == "wrong_result" and step % 4 == 1:
            reported = result.copy()
            reported.view(np.uint8)[0] ^= 1
        self.emit(
            "end",
            id=op_id,
            what="allreduce",
            tag=tag,
            step=step,
            ok=True,
            epoch=info.epoch,
            contributors=list(info.contributors),
            world=info.world_size,
            attempts=info.attempts,
            elements=int(result.size),
            digest=digest(reported),
            tx_bytes=info.tx_bytes,
            rx_bytes=info.rx_bytes,
        )

    def fail(self, op_id: int, tag: int, step: int, exc: PcclError) -> None:
        if self.args.bug == "lie_outcome":
            self.emit("end", id=op_id, what="allreduce", tag=tag, step=step, ok=True, lie=True,
                      epoch=exc.epoch, contributors=[], digest="", elements=0)
            return
        assert self.comm is not None
        ring = list(self.comm.ring_of(exc.epoch)) if isinstance(exc.epoch, int) else []
        self.emit(
            "end", id=op_id, what="allreduce", tag=tag, step=step, ok=False, kind=type(exc).__name__,
            epoch=exc.epoch, ring=ring, msg=str(exc)[:300],
        )

    def collectives(self) -> bool:
        """The step's all-reduces; True when all succeeded (then the state is updated)."""
        comm = self.comm
        assert comm is not None
        step = int(self.state.tensors["step"][0])
        me = comm.peer_id
        results: dict[int, np.ndarray] = {}
        pending: list[tuple[int, int, np.ndarray, Any]] = []

        def settle(op_id: int, tag: int, x: np.ndarray, wait: Any) -> PcclError | None:
            try:
                info = wait()
            except PcclError as exc:
                self.fail(op_id, tag, step, exc)
                return exc
            self.finish(op_id, tag, step, x, info)
            results[tag] = x
            return None

        errors: list[PcclError | None] = []
        for tag, elements, is_async in OPS:
            x = contribution(me, tag, step, elements)
            op_id = self.begin("allreduce", tag, step)
            if is_async:
                pending.append((op_id, tag, x, comm.all_reduce_async(x, tag=tag, retry=True)))
            else:
                errors.append(settle(op_id, tag, x, lambda x=x, tag=tag: comm.all_reduce(x, tag=tag, retry=True)))
        errors += [settle(op_id, tag, x, handle.wait) for op_id, tag, x, handle in pending]
        first_error = next((e for e in errors if e is not None), None)
        if first_error is not None:
            raise first_error
        w = self.state.tensors["w"]
        w += results[0][: w.size].astype(np.float64) * 1e-3
        w += results[1][: w.size].astype(np.float64) * 1e-6
        self.state.tensors["blob"][step % BLOB_ELEMENTS] += float(results[2][0])
        self.state.tensors["step"][0] = step + 1
        return True

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        self.comm = self.join()
        while not self.stop:
            comm = self.comm
            try:
                # A joiner runs this too: its first pending_peers() and update_topology()
                # replay the members' part of the vote that admitted it (docs/protocol.md).
                if comm.pending_peers() > 0:
                    comm.update_topology()
                self.sync()
                # Bump once per completed sync, whatever the step does next: the group
                # expects revision G + 1 from every peer that took part in sync G.
                self.state.revision += 1
                self.collectives()
            except StateMismatch as exc:
                # Our revision no longer fits the group's: rejoin as a new peer, whose
                # revision is free (it receives the group's state).
                self.rejoin(f"StateMismatch: {exc}")
            except Aborted as exc:
                if self.stop:
                    break
                self.rejoin(f"Aborted: {exc}")
            except PcclError as exc:
                self.emit("step_failed", error=f"{type(exc).__name__}: {exc}"[:300])
                if comm.rank < 0:
                    self.rejoin(f"not in the ring after {type(exc).__name__}")
            if self.args.step_pause > 0:
                time.sleep(self.args.step_pause)
        assert self.comm is not None
        self.emit("leaving", peer=self.comm.peer_id)
        self.comm.close()
        self.events.close()
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stress.peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--master", required=True)
    parser.add_argument("--host", default="127.0.0.1", help="address the peer's data plane listens on")
    parser.add_argument("--events", required=True, help="JSON-lines event file to append to")
    parser.add_argument("--index", type=int, default=0, help="slot number, for the records")
    parser.add_argument("--heartbeat-interval", type=float, default=0.5)
    parser.add_argument("--heartbeat-timeout", type=float, default=2.5)
    parser.add_argument("--op-timeout", type=float, default=30.0)
    parser.add_argument("--step-pause", type=float, default=0.0, help="seconds to sleep between steps")
    parser.add_argument("--bug", choices=BUGS, help="test only: misbehave on purpose")
    args = parser.parse_args(argv)
    peer = Peer(args)

    def leave(signum: int, frame: Any) -> None:
        peer.stop = True

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    try:
        return peer.run()
    except PcclError as exc:
        print(f"stress peer {args.index} (pid {os.getpid()}): {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
