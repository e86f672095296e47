"""`pccl master`: run the coordinator in the foreground until SIGINT/SIGTERM.

    pccl master --host 0.0.0.0 --port 48148 --secret-file /etc/pccl/secret --metrics-port 9108

The secret comes from --secret-file or PCCL_SECRET; without one on a non-loopback
address the master warns loudly (anyone who reaches the port could join)."""

from __future__ import annotations

import argparse
import signal
import sys

import zmq

from pccl_py.config import Config
from pccl_py.errors import ConfigError
from pccl_py.master.server import Master
from pccl_py.wire import auth
from pccl_py.wire.aio import new_event_loop


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=48148, help="listen port (default 48148; 0: any free port)")
    parser.add_argument("--heartbeat-interval", type=float, help="seconds between peer heartbeats")
    parser.add_argument("--heartbeat-timeout", type=float, help="evict a peer silent this long (seconds)")
    parser.add_argument("--event-log", help="append structured events (JSON lines) to this file")
    parser.add_argument(
        "--startup-grace",
        type=float,
        help="seconds a (re)started master waits for the members of a running group to rejoin before "
        "it founds the group afresh from new peers (default: four heartbeat intervals, 1 s)",
    )
    parser.add_argument("--secret-file", help="file holding the shared secret (default: $PCCL_SECRET)")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0: any free port)")
    parser.add_argument("--metrics-host", help="address of the metrics endpoint (default: --host)")


def main(args: argparse.Namespace) -> int:
    config = Config.from_env(
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout,
        event_log=args.event_log,
    )
    grace = args.startup_grace if args.startup_grace is not None else 4 * config.heartbeat_interval
    config = config.replace(startup_grace=grace)
    try:
        secret = auth.read_secret_file(args.secret_file) if args.secret_file else auth.normalize_secret(config.secret)
    except ConfigError as exc:
        print(f"pccl master: {exc}", file=sys.stderr)
        return 2
    # Without a secret on a non-loopback address the Master logs the warning itself.
    master = Master(
        host=args.host, port=args.port, secret=secret, config=config,
        metrics_port=args.metrics_port, metrics_host=args.metrics_host,
    )
    loop = new_event_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, master.close)

    def ready(address: str) -> None:
        print(f"pccl master listening on {address}", flush=True)
        if master.metrics_address is not None:
            print(f"pccl master metrics at http://{master.metrics_address}/metrics", flush=True)

    try:
        loop.run_until_complete(master.serve(on_ready=ready))
    except (OSError, zmq.ZMQError) as exc:
        print(f"pccl master: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    finally:
        loop.close()
    return 0
