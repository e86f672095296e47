"""`pccl run`: launch a training command on this node with the environment a pccl_py
program reads (as torchrun does for torch.distributed), forward signals to it, and
revive it when it crashes (up to --max-restarts times).

    pccl run --master 10.0.0.1:48148 --group 0 --max-restarts 3 -- python -m examples.tinylm.train

Environment set for the command: PCCL_MASTER (host:port), PCCL_GROUP, PCCL_LOCAL_INDEX
(the launch index, also counting restarts as the same index), PCCL_RESTART (0 first),
and PCCL_SECRET when --secret-file is given (else an inherited PCCL_SECRET passes
through). The secret travels in the environment, never on a command line.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from pccl_py.errors import ConfigError
from pccl_py.wire import auth


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--master", required=True, help="the master's host:port")
    parser.add_argument("--group", type=int, default=0, help="peer group (default 0)")
    parser.add_argument("--index", type=int, default=0, help="this node's launch index (PCCL_LOCAL_INDEX)")
    parser.add_argument("--max-restarts", type=int, default=0, help="revive a crashed command this many times")
    parser.add_argument("--restart-delay", type=float, default=1.0, help="seconds to wait before a restart")
    parser.add_argument("--secret-file", help="file holding the shared secret, passed on as PCCL_SECRET")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")


def main(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("pccl run: no command given (pccl run --master H:P -- python train.py)", file=sys.stderr)
        return 2
    secret_env: dict[str, str] = {}
    if args.secret_file:
        try:
            secret_env["PCCL_SECRET"] = auth.read_secret_file(args.secret_file).decode()
        except (ConfigError, UnicodeDecodeError) as exc:
            print(f"pccl run: {exc}", file=sys.stderr)
            return 2
    child: subprocess.Popen[bytes] | None = None
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    restarts = 0
    while True:
        env = dict(os.environ)
        env.update(
            PCCL_MASTER=args.master,
            PCCL_GROUP=str(args.group),
            PCCL_LOCAL_INDEX=str(args.index),
            PCCL_RESTART=str(restarts),
            **secret_env,
        )
        child = subprocess.Popen(command, env=env)
        code = child.wait()
        if code == 0 or stopping:
            return code if code >= 0 else 128 - code
        if restarts >= args.max_restarts:
            print(f"pccl run: command failed with exit code {code}; no restarts left", file=sys.stderr)
            return code if code > 0 else 128 - code
        restarts += 1
        print(f"pccl run: command failed with exit code {code}; restart {restarts}/{args.max_restarts}",
              file=sys.stderr, flush=True)
        time.sleep(args.restart_delay)
