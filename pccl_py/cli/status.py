"""`pccl status`: what the master knows: peers, groups, epochs, rings, shared-state
revisions and the bandwidth matrix; `--watch` refreshes until Ctrl-C, `--json` prints
the raw answer.

    pccl status --master 10.0.0.1:48148 [--secret-file FILE] [--watch] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import zmq
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from pccl_py.config import Config
from pccl_py.errors import AuthError, PcclError, Timeout
from pccl_py.wire import auth, protocol


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--master", required=True, help="the master's host:port")
    parser.add_argument("--secret-file", help="file holding the shared secret (default: $PCCL_SECRET)")
    parser.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes with --watch")
    parser.add_argument("--json", action="store_true", help="print the master's answer as JSON")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the master")


class StatusClient:
    """A DEALER socket that authenticates (when given a secret) and asks for status.
    Owns its socket; close() releases it."""

    def __init__(self, master: str, secret: bytes | None, timeout: float) -> None:
        host, _, port = master.rpartition(":")
        if not host or not port.isdigit():
            raise PcclError(f"master address must be host:port, got {master!r}")
        self._master = master
        self._secret = secret
        self._timeout = timeout
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTING_ID, b"\x01" + auth.new_nonce())
        self._sock.connect(f"tcp://{host}:{port}")
        self._authenticated = secret is None

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()

    def _request(self, msg: protocol.Message, want: str) -> protocol.Message:
        self._sock.send(protocol.encode(msg))
        deadline = time.monotonic() + self._timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._sock.poll(int(remaining * 1000)):
                raise Timeout(f"no answer from the master at {self._master} within {self._timeout}s")
            reply = protocol.decode(self._sock.recv(), 64 << 20)
            if reply["t"] == want:
                return reply
            if reply["t"] == "error":
                error = AuthError if reply["code"] == "auth" else PcclError
                raise error(f"the master refused: {reply['msg']}")

    def _authenticate(self) -> None:
        assert self._secret is not None
        nonce = auth.new_nonce()
        challenge = self._request(protocol.make("auth_begin", nonce=nonce), "auth_challenge")
        if not challenge["proof"]:
            raise AuthError(f"the master at {self._master} has no shared secret")
        if not auth.verify(auth.master_proof(self._secret, nonce, challenge["nonce"]), challenge["proof"]):
            raise AuthError(f"the master at {self._master} holds a different shared secret")
        self._request(protocol.make("auth", mac=auth.client_proof(self._secret, challenge["nonce"], nonce)), "auth_ok")
        self._authenticated = True

    def status(self) -> dict[str, Any]:
        if not self._authenticated:
            self._authenticate()
        state: dict[str, Any] = self._request(protocol.make("status"), "status_reply")["state"]
        return state


def transport_text(tcp: dict[str, Any]) -> str:
    """'bbr, 8/32 MiB' for a peer's "transport" report ('-' before it arrives), '!'
    after the name where it is not the congestion control the peer asked for."""
    if not tcp:
        return "-"
    mib = 1 << 20
    cc = tcp.get("cc") or "?"
    flag = " !" if tcp.get("cc_note") else ""
    return f"{cc}{flag}, {tcp.get('send_buffer', 0) / mib:.0f}/{tcp.get('recv_buffer', 0) / mib:.0f} MiB"


def render(state: dict[str, Any]) -> Group:
    """Rich tables of a status answer (Membership.status() plus the master's address)."""
    peers: dict[str, dict[str, Any]] = state.get("peers", {})
    groups: dict[str, dict[str, Any]] = state.get("groups", {})

    def label(pid: Any) -> str:
        peer = peers.get(str(pid))
        name = peer.get("name") if peer else ""
        return f"{name} ({pid})" if name else str(pid)

    gt = Table(title=f"master {state.get('address', '?')}: groups", title_justify="left")
    for col in ("group", "epoch", "world", "pending", "revision", "ring"):
        gt.add_column(col, overflow="fold")
    for gid, g in sorted(groups.items(), key=lambda kv: int(kv[0])):
        ring = g.get("ring", [])
        gt.add_row(gid, str(g.get("epoch")), str(len(ring)), str(len(g.get("pending", []))),
                   "-" if g.get("state_revision") is None else str(g["state_revision"]),
                   " -> ".join(label(p) for p in ring))
    pt = Table(title=f"peers ({len(peers)})", title_justify="left")
    for col in ("peer", "name", "group", "phase", "data address", "tcp (cc, buffers send/recv)", "heartbeats"):
        pt.add_column(col, overflow="fold")
    notes: list[str] = []
    for pid, p in sorted(peers.items(), key=lambda kv: (kv[1].get("group", 0), kv[0])):
        tcp = p.get("transport") or {}
        pt.add_row(pid, p.get("name", ""), str(p.get("group")), str(p.get("phase")), str(p.get("address")),
                   transport_text(tcp), "udp + tcp" if p.get("datagrams") else "tcp only (+1 s)")
        if tcp.get("cc_note"):
            notes.append(f"{label(pid)}: {tcp['cc_note']}; its connections use {tcp.get('cc', '?')}")
    parts: list[Any] = [gt, pt]
    if notes:
        parts.append("[yellow]" + "\n".join(escape(n) for n in notes) + "[/]")
    for gid, g in sorted(groups.items(), key=lambda kv: int(kv[0])):
        bandwidth = g.get("bandwidth") or []
        bt = Table(title=f"group {gid}: bandwidth (MB/s, sender -> receiver)", title_justify="left")
        if not bandwidth:
            bt.add_column("not measured yet (optimize_topology() measures it)")
        else:
            bt.add_column("sender")
            bt.add_column("receiver")
            bt.add_column("MB/s", justify="right")
            for sender, receiver, rate in bandwidth:
                bt.add_row(label(sender), label(receiver), f"{rate / 1e6:.1f}")
        parts.append(bt)
    return Group(*parts)


def main(args: argparse.Namespace) -> int:
    try:
        secret = auth.read_secret_file(args.secret_file) if args.secret_file else auth.normalize_secret(
            Config.from_env().secret
        )
        client = StatusClient(args.master, secret, args.timeout)
    except PcclError as exc:
        print(f"pccl status: {exc}", file=sys.stderr)
        return 2
    console = Console()
    try:
        if args.json:
            print(json.dumps(client.status(), indent=2, sort_keys=True))
            return 0
        if not args.watch:
            console.print(render(client.status()))
            return 0
        with Live(render(client.status()), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(args.interval)
                live.update(render(client.status()))
    except PcclError as exc:
        print(f"pccl status: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()
