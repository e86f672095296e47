"""What a peer's data connections get from its host: the TCP congestion control and the
largest socket buffers. Told to the master (shown by `pccl status`) and logged once, with
what to change where the host holds the data plane back (docs/wan.md, "What a host
needs")."""

from __future__ import annotations

import logging
from typing import Any

from pccl_py.wire import protocol

log = logging.getLogger(__name__)

# One connection carries about two thirds of its send buffer per round trip (the rest is
# the kernel's bookkeeping); the figures below are for this link.
_REFERENCE_RTT = 0.1
_REFERENCE_BITS = 1e9


def engine_congestion_control(asked: str) -> str:
    """Config.congestion_control -> the engine's argument ("" keeps the host's)."""
    return "" if asked in ("", "system") else asked


def one_connection_bits(send_buffer: int, rtt: float = _REFERENCE_RTT) -> float:
    """The most one connection with this send buffer (the kernel's bytes) carries at
    this round trip, in bits/s."""
    return send_buffer * 2 / 3 * 8 / rtt


def wmem_max_for(bits: float = _REFERENCE_BITS, rtt: float = _REFERENCE_RTT) -> int:
    """The net.core.wmem_max (and rmem_max) that lets one connection carry `bits` per
    second at this round trip: the kernel doubles an explicit size, two thirds of which
    carry payload."""
    return int(bits / 8 * rtt * 3 / 4 + 0.5)


def report(engine: Any) -> protocol.Message:
    """The "transport" message for the master."""
    return protocol.make(
        "transport",
        cc=engine.congestion_control,
        cc_note=engine.congestion_control_note,
        send_buffer=int(engine.send_buffer_max),
        recv_buffer=int(engine.recv_buffer_max),
    )


def log_facts(engine: Any) -> None:
    """One line on what the data plane gets; a warning where the congestion control
    asked for is not in use."""
    send, recv = int(engine.send_buffer_max), int(engine.recv_buffer_max)
    if engine.congestion_control_note:
        cost = "" if engine.congestion_control == "bbr" else (
            ", which backs off on every loss: long or lossy links carry far less (docs/wan.md, "
            "\"What a host needs\")"
        )
        log.warning(
            "data plane: %s; its connections use the host's default, %s%s",
            engine.congestion_control_note, engine.congestion_control, cost,
        )
    one = one_connection_bits(send)
    advice = ""
    if 0 < one < _REFERENCE_BITS:
        advice = (
            f"; one connection carries at most {one / 1e6:.0f} Mbit/s at 100 ms (connections_per_peer=0 opens "
            f"more per peer); net.core.wmem_max and rmem_max of {wmem_max_for()} or more let one carry 1 Gbit/s"
        )
    log.info(
        "data plane: TCP congestion control %s, socket buffers up to %.1f MiB send / %.1f MiB receive%s",
        engine.congestion_control, send / (1 << 20), recv / (1 << 20), advice,
    )
