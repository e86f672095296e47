"""`pccl master`: run the coordinator in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys

import zmq

from pccl_py.config import Config
from pccl_py.master import Master, new_event_loop


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=48148, help="listen port (default 48148; 0: any free port)")
    parser.add_argument("--heartbeat-interval", type=float, help="seconds between peer heartbeats")
    parser.add_argument("--heartbeat-timeout", type=float, help="evict a peer silent this long (seconds)")
    parser.add_argument("--event-log", help="append structured events (JSON lines) to this file")


def main(args: argparse.Namespace) -> int:
    config = Config.from_env(
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout,
        event_log=args.event_log,
    )
    master = Master(host=args.host, port=args.port, config=config)
    loop = new_event_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, master.close)

    def ready(address: str) -> None:
        print(f"pccl master listening on {address}", flush=True)

    try:
        loop.run_until_complete(master.serve(on_ready=ready))
    except (OSError, zmq.ZMQError) as exc:
        print(f"pccl master: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    finally:
        loop.close()
    return 0
