"""What the WAN emulator (pccl_py.tools.wan) costs and how exact it is:

  throughput  iperf-like bulk TCP streams between host pairs (0->1, 2->3, ...) through an
              unlimited, zero-delay relay: the aggregate is what the relay can carry here
              (with --host SPEC, every host's access link set to SPEC, e.g. access=20gbit:
              never the bottleneck, but every packet crosses both access stages);
  delay       UDP ping-pong between two hosts behind a link of a given RTT: the measured
              round trips against the configured one.

    python -m pccl_py.tools.wan_bench [--pairs 2] [--seconds 5] [--rtt 20ms] [--pings 200] [--host SPEC]

Needs what a WanNet needs (root, /dev/net/tun, ip). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

from pccl_py.tools.wan import HostSpec, LinkSpec, WanNet, parse_duration, unavailable

# Runs in the receiving host: accept one stream, count its bytes until EOF.
_RECEIVER = """
import socket, sys, time
s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); buf = bytearray(1 << 20); n = 0; t0 = None
while True:
    k = c.recv_into(buf)
    if t0 is None: t0 = time.monotonic()
    if not k: break
    n += k
print(n, time.monotonic() - (t0 or time.monotonic()), flush=True)
"""
# Runs in the sending host: send for argv[3] seconds.
_SENDER = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2]))); buf = bytes(1 << 20)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end: c.sendall(buf)
c.close()
"""


def throughput(pairs: int, seconds: float, link: LinkSpec, host: HostSpec | None = None) -> dict[str, Any]:
    """Aggregate goodput of `pairs` bulk TCP streams through the relay."""
    with WanNet(2 * pairs, link, host=host) as net:
        receivers: list[subprocess.Popen[str]] = []
        senders: list[subprocess.Popen[str]] = []
        try:
            for k in range(pairs):
                receivers.append(
                    subprocess.Popen(
                        [*net.exec_prefix(2 * k + 1), sys.executable, "-c", _RECEIVER, net.ips[2 * k + 1]],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                )
            ports = [int((r.stdout.readline() if r.stdout else "0").strip()) for r in receivers]
            for k in range(pairs):
                senders.append(
                    subprocess.Popen(
                        [*net.exec_prefix(2 * k), sys.executable, "-c", _SENDER, net.ips[2 * k + 1],
                         str(ports[k]), str(seconds)],
                        text=True,
                    )
                )
            for s in senders:
                s.wait(timeout=seconds + 60)
            streams = []
            for r in receivers:
                out, _ = r.communicate(timeout=60)
                nbytes, secs = out.split()
                streams.append(int(nbytes) * 8 / float(secs) / 1e9)
            stats = net.stats()
        finally:
            for p in [*senders, *receivers]:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    drops = sum(v for entry in stats["links"] for key, v in entry.items() if key.startswith("dropped"))
    drops += sum(v for entry in stats["hosts"] for key, v in entry.items() if key.startswith("dropped"))
    return {
        "link": str(link),
        "host": str(host or HostSpec()),
        "pairs": pairs,
        "seconds": seconds,
        "aggregate_gbit_s": round(sum(streams), 3),
        "per_stream_gbit_s": [round(s, 3) for s in streams],
        "relay_packets": sum(entry["packets"] for entry in stats["links"]),
        "relay_drops": drops,
    }


def delay_accuracy(link: LinkSpec, pings: int) -> dict[str, Any]:
    """Round trips of small UDP datagrams between hosts 0 and 1 (echoed by a thread)."""
    with WanNet(2, link) as net:
        a = net.call_in(0, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        b = net.call_in(1, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        try:
            a.bind((net.ips[0], 0))
            b.bind((net.ips[1], 0))
            a.settimeout(5.0)
            b.settimeout(5.0)
            rtts = []
            for i in range(pings):
                t0 = time.perf_counter()
                a.sendto(i.to_bytes(4, "big"), b.getsockname())
                data, peer = b.recvfrom(64)
                b.sendto(data, peer)
                a.recvfrom(64)
                rtts.append(time.perf_counter() - t0)
        finally:
            a.close()
            b.close()
    errors = sorted((r - link.rtt_s) * 1e3 for r in rtts)
    return {
        "link": str(link),
        "pings": pings,
        "configured_rtt_ms": link.rtt_s * 1e3,
        "median_rtt_ms": round(statistics.median(rtts) * 1e3, 4),
        "error_ms_min": round(errors[0], 4),
        "error_ms_median": round(statistics.median(errors), 4),
        "error_ms_p99": round(errors[min(len(errors) - 1, int(0.99 * len(errors)))], 4),
        "error_ms_max": round(errors[-1], 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pccl_py.tools.wan_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2, help="concurrent TCP streams, one per host pair (default 2)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the throughput run (default 5)")
    parser.add_argument("--rtt", type=parse_duration, default=0.02, help="RTT of the delay run (default 20ms)")
    parser.add_argument("--pings", type=int, default=200, help="round trips of the delay run (default 200)")
    parser.add_argument(
        "--host",
        type=HostSpec.parse,
        default=None,
        metavar="SPEC",
        help="every host's access link in the throughput run (pccl_py.tools.wan.HostSpec: up, down, access, queue; "
        "e.g. access=20gbit); default: none",
    )
    args = parser.parse_args(argv)
    why = unavailable()
    if why is not None:
        print(f"error: the WAN emulator {why}", file=sys.stderr)
        return 2
    report = {
        "throughput": throughput(args.pairs, args.seconds, LinkSpec(queue_s=0.05), args.host),
        "delay": delay_accuracy(LinkSpec(rtt_s=args.rtt), args.pings),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
