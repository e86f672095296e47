"""sync_shared_state(), mixed into the Communicator: the request with the state's
description, the plan the master elects, the fetch of the differing entries from
the peers holding the elected bytes, and the group's result."""

from __future__ import annotations

import logging
from typing import Any

from pccl_py.errors import (
    FailureKind,
    InvalidArgument,
    PcclError,
    error_class,
    failure_kind,
)
from pccl_py.peer.contract import PeerCore
from pccl_py.peer.shared_state import (
    SharedState,
    Source,
    SyncInfo,
    check_strategy,
    fetch_entries,
    rich_progress,
)
from pccl_py.types import SyncStrategy
from pccl_py.wire import protocol

log = logging.getLogger(__name__)


class SyncCalls:
    def sync_shared_state(
        self: PeerCore,
        state: SharedState,
        strategy: SyncStrategy = SyncStrategy.ENFORCE_POPULAR,
        timeout: float | None = None,
        progress: bool | Any = False,
    ) -> SyncInfo:
        """Collective: afterwards every peer holds the same bytes in every entry of
        `state` and the same revision. The master elects the content (see
        pccl_py.election); peers whose bytes differ fetch the entries from the peers
        holding the elected bytes, several at once, verified by hash. Raises
        StateMismatch (layouts or revisions that cannot be reconciled), PeerLost (an
        entry could not be obtained), Timeout. `progress`: True for a progress bar on
        large transfers, or a callable(done_bytes, total_bytes)."""
        self._require()
        session = self._session
        check_strategy(strategy)
        assert self._engine is not None
        deadline = self._deadline(timeout, self.config.op_timeout)
        self._fresh = False
        entries = state.entries()
        buffers = state.buffers()
        exposure = self._engine.expose_state(buffers)  # ready to serve before anyone is told to fetch
        rx = 0
        received = 0
        fetched: list[int] = []
        try:
            session.reset_sync()
            request = protocol.make(
                "sync",
                epoch=self.epoch,
                revision=state.revision,
                strategy=strategy.value,
                exposure=exposure.id,
                entries=[[e.name, e.dtype, list(e.shape), e.nbytes, e.hash] for e in entries],
            )
            size = len(protocol.encode(request))
            if size > self.config.max_message_bytes:
                raise InvalidArgument(
                    f"the state's description ({len(entries)} entries, {size} bytes) exceeds the "
                    f"{self.config.max_message_bytes}-byte message cap (Config.max_message_bytes): "
                    "merge small tensors into fewer entries or raise the cap on every peer and the master"
                )
            while True:
                plan = self._ask(
                    request,
                    session.sync_plan_or_result,
                    deadline,
                    "the shared-state plan",
                    call="sync_shared_state",
                )
                if plan["t"] == "sync_plan":
                    ok, kind, msg = True, "", ""
                    wanted = [(int(i), int(h), [int(p) for p in holders]) for i, h, holders in plan["fetch"]]
                    received = len(wanted)
                    fetched = [i for i, _, _ in wanted]
                    sources = {
                        int(p): Source(int(p), str(host), int(port), int(exp)) for p, host, port, exp in plan["sources"]
                    }
                    close_bar = None
                    callback = progress if callable(progress) else None
                    total = sum(int(buffers[i].nbytes) for i, _, _ in wanted)
                    if progress is True and total >= (64 << 20):
                        callback, close_bar = rich_progress()
                    self._end_warmup()
                    try:
                        rx = fetch_entries(
                            self._engine,
                            buffers,
                            wanted,
                            sources,
                            deadline,
                            progress=callback,
                            receive=self._receive_window,
                        )
                    except PcclError as exc:
                        ok, kind, msg = False, failure_kind(exc), str(exc)
                    finally:
                        if close_bar is not None:
                            close_bar()
                    result = self._ask(
                        protocol.make(
                            "sync_done", ok=ok, kind=kind, msg=msg[:2000], rx_bytes=rx, revision=int(plan["revision"])
                        ),
                        session.sync_result,
                        deadline,
                        "the shared-state result",
                        call="sync_shared_state",
                    )
                else:
                    result = plan
                if result["ok"] or result["kind"] != FailureKind.RETRY:
                    break
                # The master restarted during this sync and never saw it: ask again (the
                # other members do the same, so the collective forms anew).
                session.reset_sync()
        finally:
            tx = exposure.close()
        if not result["ok"]:
            raise error_class(result["kind"])(f"shared-state sync failed: {result['msg']}", epoch=self.epoch)
        state.stage_out(fetched)  # CUDA entries get the received bytes only now
        state.revision = result["revision"]
        session.set_synced_revision(state.revision)
        self._events.emit("sync", revision=state.revision, rx_bytes=rx, tx_bytes=tx, received=received)
        return SyncInfo(revision=state.revision, rx_bytes=rx, tx_bytes=tx, entries_received=received)
