"""The core installs and runs without torch (torch is the `torch` extra): a master, two
peers and a numpy all-reduce in a subprocess where `import torch` fails; the parts
that need torch say which extra to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)

BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed here")
        return None
sys.meta_path.insert(0, _NoTorch())
"""


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)], capture_output=True, text=True, timeout=90
    )


def test_the_core_runs_without_torch() -> None:
    result = run(
        """
        import threading, numpy as np
        import pccl_py as pccl
        with pccl.Master() as master:
            a = pccl.Communicator(master.address).connect(timeout=10)
            b = pccl.Communicator(master.address)
            t = threading.Thread(target=b.connect, kwargs={"timeout": 10})
            t.start()
            while a.pending_peers(timeout=10) == 0:
                pass
            a.update_topology(timeout=10)
            t.join()
            xs = [np.full(1000, 1.0, np.float32), np.full(1000, 2.0, np.float32)]
            h = b.all_reduce_async(xs[1])
            a.all_reduce(xs[0])
            h.wait(10)
            assert (xs[0] == 3.0).all() and (xs[1] == 3.0).all()
            a.close(); b.close()
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.parametrize("module", ["pccl_py.optim", "pccl_py.torch"])
def test_the_torch_parts_name_the_extra(module: str) -> None:
    result = run(f"import {module}")
    assert result.returncode != 0
    assert "pip install 'pccl_py[torch]'" in result.stderr, result.stderr[-2000:]


def test_bench_compare_gloo_names_the_extra() -> None:
    result = run(
        """
        from pccl_py.cli.main import main
        sys.exit(main(["bench", "--peers", "2", "--sizes", "1K", "--compare", "gloo"]))
        """
    )
    assert result.returncode == 2 and "pccl_py[torch]" in result.stderr, (result.stdout, result.stderr)
