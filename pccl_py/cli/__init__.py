"""The `pccl` command: argument parsing and wiring of the subcommands (master, run,
status, bench). May import any layer."""

from pccl_py.cli.main import main

__all__ = ["main"]
