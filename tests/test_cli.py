"""The `pccl` command line, run as a user would: separate processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

import pccl_py as pccl

PCCL = [sys.executable, "-m", "pccl_py.cli"]


def test_pccl_master_serves_peers_and_stops_on_sigterm(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    proc = subprocess.Popen(
        PCCL + ["master", "--port", "0", "--event-log", str(events)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on (\S+:\d+)", line)
        assert match, f"unexpected first line: {line!r}"
        with pccl.Communicator(match.group(1)).connect(timeout=20) as comm:
            x = np.arange(16, dtype=np.float32)
            info = comm.all_reduce(x, timeout=20)
            assert info.world_size == 1 and x[5] == 5.0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        kinds = [line for line in events.read_text().splitlines() if '"event": "join"' in line]
        assert len(kinds) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_pccl_master_reports_a_port_in_use() -> None:
    with pccl.Master() as running:
        port = running.address.rsplit(":", 1)[1]
        result = subprocess.run(PCCL + ["master", "--port", port], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "cannot listen" in result.stderr


def test_pccl_help_lists_the_subcommands() -> None:
    result = subprocess.run(PCCL + ["--help"], capture_output=True, text=True, timeout=30, env=os.environ)
    assert result.returncode == 0
    assert "master" in result.stdout and "bench" in result.stdout


def test_pccl_run_sets_the_environment_and_revives_a_crashed_command(tmp_path: Path) -> None:
    """The command crashes (SIGKILLs itself) on its first run and succeeds on the second:
    --max-restarts 1 revives it, with PCCL_MASTER and PCCL_RESTART set."""
    log = tmp_path / "runs.txt"
    script = (
        "import os, signal\n"
        f"open({str(log)!r}, 'a').write(os.environ['PCCL_MASTER'] + ' ' + os.environ['PCCL_RESTART'] + '\\n')\n"
        "if os.environ['PCCL_RESTART'] == '0':\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run(
        PCCL + ["run", "--master", "127.0.0.1:1", "--max-restarts", "1", "--restart-delay", "0", "--",
                sys.executable, "-c", script],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == ["127.0.0.1:1 0", "127.0.0.1:1 1"]
    assert "restart 1/1" in result.stderr


def test_pccl_run_gives_up_after_max_restarts(tmp_path: Path) -> None:
    result = subprocess.run(
        PCCL + ["run", "--master", "127.0.0.1:1", "--restart-delay", "0", "--", sys.executable, "-c",
                "raise SystemExit(3)"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 3
    assert "no restarts left" in result.stderr
