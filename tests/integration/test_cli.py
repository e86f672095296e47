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


def test_pccl_master_without_a_secret_off_loopback_warns_once() -> None:
    """Listening on every interface (this machine has only loopback) without a secret."""
    env = {k: v for k, v in os.environ.items() if k != "PCCL_SECRET"}
    proc = subprocess.Popen(
        PCCL + ["master", "--host", "0.0.0.0", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        assert "listening on" in proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert err.lower().count("without a shared secret") == 1, err


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


def _steps(path: Path) -> list[dict]:
    import json

    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_pccl_run_revives_a_killed_peer_that_rejoins_and_receives_the_state(tmp_path: Path) -> None:
    """Two nodes under `pccl run --max-restarts 1 --secret-file F`, training with a
    shared state. SIGKILL node 1's training process (not its launcher): the launcher
    revives it, the new process rejoins, receives the whole state (bytes equal to node
    0's at the same revision) and `pccl status` lists it."""
    import json

    secret = "run-test-secret-7f3a"
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret + "\n")
    stop = tmp_path / "stop"
    logs = [tmp_path / f"node{i}.jsonl" for i in range(2)]
    worker = str(Path(__file__).parents[1] / "helpers" / "run_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "PCCL_SECRET"}
    launchers: list[subprocess.Popen[str]] = []
    with pccl.Master(secret=secret) as master:
        try:
            for i in range(2):
                launchers.append(subprocess.Popen(
                    PCCL + ["run", "--master", master.address, "--index", str(i), "--max-restarts", "1",
                            "--restart-delay", "0.2", "--secret-file", str(secret_file), "--",
                            sys.executable, worker, str(logs[i]), str(stop), "120"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                ))
                _wait_for(lambda i=i: any(s["event"] == "step" for s in _steps(logs[i])), 60, f"node {i} training")
            _wait_for(lambda: any(s.get("world") == 2 for s in _steps(logs[0])), 60, "a group of two")
            victim = next(s for s in _steps(logs[1]) if s["event"] == "connected")
            cmdline = Path(f"/proc/{victim['pid']}/cmdline").read_bytes()
            assert secret.encode() not in cmdline  # the secret travels in the environment only
            os.kill(victim["pid"], signal.SIGKILL)

            revived = _wait_for(
                lambda: [s for s in _steps(logs[1]) if s["event"] == "step" and s["restart"] == 1], 60, "the revival"
            )
            first = revived[0]
            assert first["rx_bytes"] == (1 << 18) * 4  # the whole state, received from node 0
            ref = _wait_for(
                lambda: [s for s in _steps(logs[0]) if s["event"] == "step" and s["revision"] == first["revision"]],
                30, "node 0 at the same revision",
            )
            assert ref[-1]["sha256"] == first["sha256"]  # bit-identical

            status = subprocess.run(
                PCCL + ["status", "--master", master.address, "--json"], capture_output=True, text=True,
                timeout=30, env={**env, "PCCL_SECRET": secret},
            )
            assert status.returncode == 0, status.stderr
            peers = json.loads(status.stdout)["peers"]
            names = {p["name"]: p["phase"] for p in peers.values()}
            assert names.get("node1-r1") == "admitted", names
            assert "node1-r0" not in names
            table = subprocess.run(
                PCCL + ["status", "--master", master.address, "--secret-file", str(secret_file)],
                capture_output=True, text=True, timeout=30, env={**env, "COLUMNS": "200"},
            )
            assert table.returncode == 0 and "node1-r1" in table.stdout, table.stdout + table.stderr
            refused = subprocess.run(PCCL + ["status", "--master", master.address], capture_output=True,
                                     text=True, timeout=30, env=env)
            assert refused.returncode == 1 and "shared secret" in refused.stderr

            stop.write_text("")
            for launcher in launchers:
                launcher.wait(timeout=60)
            assert "restart 1/1" in launchers[1].communicate()[1]
            assert [launcher.returncode for launcher in launchers] == [0, 0]
        finally:
            stop.write_text("")
            for launcher in launchers:
                if launcher.poll() is None:
                    launcher.kill()
                    launcher.wait(10)
