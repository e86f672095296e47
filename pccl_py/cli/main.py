"""The `pccl` command line. Each subcommand lives in its own module, which provides
`add_arguments(parser)` and `main(args) -> exit code`; this module only wires them up and
configures logging."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pccl_py import __version__


@dataclass(frozen=True)
class Subcommand:
    name: str
    module: str  # provides add_arguments(parser) and main(args) -> int
    help: str


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand("master", "pccl_py.cli.master", "run the master (coordinator) in the foreground"),
    Subcommand("run", "pccl_py.cli.run", "launch a training command with the pccl environment, restart it on crashes"),
    Subcommand("status", "pccl_py.cli.status", "show the master's peers, groups, epochs, rings and bandwidth"),
    Subcommand(
        "bench", "pccl_py.cli.bench", "benchmark all-reduce across local processes, optionally against gloo"
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pccl", description="pccl_py: fault-tolerant collective communication"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for sub in SUBCOMMANDS:
        module = importlib.import_module(sub.module)
        sp = subparsers.add_parser(sub.name, help=sub.help, description=sub.help)
        module.add_arguments(sp)
        run: Callable[[argparse.Namespace], int] = module.main
        sp.set_defaults(run=run)
    return parser


def configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
