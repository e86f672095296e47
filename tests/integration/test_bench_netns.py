"""`pccl bench --netns-rate`: workers in shaped network namespaces (pccl_py.netns).

The refusal without root and the rate parsing run everywhere; the 2-peer run needs root
and iproute2 (skipped otherwise) and checks that the shaper is really in the path: the
unquantized ring cannot beat the link's rate, the quantized one can (it sends a quarter
of the bytes), and every namespace and link is gone afterwards.
"""

from __future__ import annotations

import argparse
import os
import subprocess

import pytest

from pccl_py.cli import bench as bench_cli
from pccl_py.tools import bench, netns

RATE = "500mbit"


def _bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_parse_rate() -> None:
    assert netns.parse_rate("1gbit") == 1_000_000_000
    assert netns.parse_rate("200mbit") == 200_000_000
    assert netns.parse_rate("1.5Gbit") == 1_500_000_000
    assert netns.parse_rate("64kbit") == 64_000
    assert netns.format_rate(200_000_000) == "200mbit"
    for bad in ("1g", "fast", "200mbps", "1bit", "0.5bit"):
        with pytest.raises(ValueError):
            netns.parse_rate(bad)
    with pytest.raises(SystemExit):
        _bench_args("--netns-rate", "lots")


def test_refuses_clearly_without_root(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(netns, "unavailable", lambda: "needs root (network namespaces, veth links and tc qdiscs)")
    args = _bench_args("--peers", "2", "--sizes", "1M", "--netns-rate", "1gbit")
    assert bench_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--netns-rate needs root" in err


def _leftovers(prefix: str) -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return [n for n in names if n.startswith(prefix)] + [line for line in links.splitlines() if prefix in line]


def test_two_peers_in_shaped_namespaces() -> None:
    why = netns.unavailable()
    if why is not None:
        pytest.skip(why)
    rate = netns.parse_rate(RATE)
    cfg = bench.BenchConfig(
        peers=(2,),
        sizes=(2 << 20,),
        iters=3,
        warmup=1,
        quantization=("minmax:uint8",),
        netns_rates=(rate,),
        op_timeout=30.0,
        start_timeout=60.0,
    )
    results = bench.run_benchmark(cfg)
    assert _leftovers(f"pq{os.getpid() % 100000}") == []
    plain = next(r for r in results if r.quantization is None)
    quant = next(r for r in results if r.quantization == "minmax:uint8")
    assert plain.netns_rate_bits == quant.netns_rate_bits == rate
    assert plain.to_json()["netns_rate_bps"] == rate
    assert plain.link_utilization is not None and quant.link_utilization is not None
    # On loopback the unquantized ring runs at several times 500 Mbit/s on this machine;
    # through the shaper it cannot exceed it (htb's 128 KiB bucket allows a little over).
    assert plain.link_utilization < 1.1, plain
    # Only fewer bytes on the wire can beat the link: uint8 sends about a quarter.
    assert quant.link_utilization > 1.2, quant
