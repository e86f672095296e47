"""The WAN emulator's model, as values and their text form (pccl_py.tools.wan runs it):

  LinkSpec  one directed pair link: rtt, rate, loss, jitter, queue;
  HostSpec  one host's access link: an uplink and a downlink, each with a rate and a
            queue, shared by every pair the host sends or receives on;
  WanSpec   both, as `pccl bench --wan` and `python -m stress --wan` take them:
            'rtt=100ms,access=1gbit' = every pair 100 ms RTT, every host 1 Gbit/s up
            and down. The pair keys are LinkSpec's; the host keys are up, down, access
            (both) and access_queue.

Durations are in us, ms or s; rates in bit, kbit, mbit or gbit (0 or 'unlimited').
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

from pccl_py.tools.netns import format_rate, parse_rate

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s)\s*$", re.IGNORECASE)
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_DEFAULT_QUEUE_S = 0.05
_LINK_KEYS = ("rtt", "rate", "loss", "jitter", "queue")
_HOST_KEYS = ("up", "down", "access", "queue", "up_queue", "down_queue")
_WAN_HOST_KEYS = ("up", "down", "access", "access_queue")


def parse_duration(text: str) -> float:
    """'100ms' -> 0.1, '250us', '1.5s' (seconds)."""
    m = _DURATION_RE.match(text)
    if m is None:
        raise ValueError(f"bad duration {text!r}: expected a number with us, ms or s (e.g. 100ms)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]


def _format_duration(seconds: float) -> str:
    if seconds == 0:
        return "0ms"
    ms = seconds * 1e3
    return f"{ms:g}ms" if ms >= 1 else f"{seconds * 1e6:g}us"


def _parse_rate(text: str) -> int:
    return 0 if text.strip() in ("0", "unlimited") else parse_rate(text)


def _format_rate(bits: int) -> str:
    return format_rate(bits) if bits else "unlimited"


def _items(text: str, what: str, keys: tuple[str, ...], example: str) -> Iterator[tuple[str, str]]:
    """(key, value) of each KEY=VALUE item of `text`, keys checked and never repeated."""
    seen: set[str] = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in keys:
            raise ValueError(
                f"bad {what} item {item!r} in {text!r}: expected KEY=VALUE with KEY one of "
                f"{', '.join(keys)} (e.g. {example})"
            )
        if key in seen:
            raise ValueError(f"bad {what} {text!r}: {key} given twice")
        seen.add(key)
        yield key, value


@dataclasses.dataclass(frozen=True)
class LinkSpec:
    """One directed link's model. rtt is the round trip of an idle path (each direction
    gets rtt/2 of one-way delay); rate_bits 0 is unlimited (no serialization, no queue);
    loss is a probability per packet; jitter is added to each packet's one-way delay,
    uniform in [-jitter, +jitter] (never reordering); queue is the drop-tail limit, as the
    time a packet may wait for the link at its rate."""

    rtt_s: float = 0.0
    rate_bits: int = 0
    loss: float = 0.0
    jitter_s: float = 0.0
    queue_s: float = _DEFAULT_QUEUE_S

    def __post_init__(self) -> None:
        if not 0 <= self.rtt_s <= 60:
            raise ValueError(f"rtt must be between 0 and 60 s, got {self.rtt_s}")
        if self.rate_bits < 0:
            raise ValueError("rate must not be negative")
        if not 0 <= self.loss <= 1:
            raise ValueError(f"loss must be a probability between 0 and 1, got {self.loss}")
        if not 0 <= self.jitter_s <= 60:
            raise ValueError(f"jitter must be between 0 and 60 s, got {self.jitter_s}")
        if not 0 <= self.queue_s <= 60:
            raise ValueError(f"queue must be between 0 and 60 s, got {self.queue_s}")

    @property
    def delay_s(self) -> float:
        """One-way delay."""
        return self.rtt_s / 2

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """'rtt=100ms,rate=1gbit,loss=0.01,jitter=20ms,queue=50ms'; every key optional
        (durations in us/ms/s, rates in bit/kbit/mbit/gbit, loss a fraction or 'N%')."""
        return cls._from_items(text, _items(text, "link spec", _LINK_KEYS, "rtt=100ms,rate=1gbit,loss=0.01"))

    @classmethod
    def _from_items(cls, text: str, items: Iterator[tuple[str, str]] | list[tuple[str, str]]) -> LinkSpec:
        fields: dict[str, Any] = {}
        names = {"rtt": "rtt_s", "jitter": "jitter_s", "queue": "queue_s"}
        for key, value in items:
            try:
                if key == "rate":
                    fields["rate_bits"] = _parse_rate(value)
                elif key == "loss":
                    v = value.strip()
                    fields["loss"] = float(v[:-1]) / 100 if v.endswith("%") else float(v)
                else:
                    fields[names[key]] = parse_duration(value)
            except ValueError as e:
                raise ValueError(f"bad link spec {text!r}: {key}: {e}") from None
        try:
            return cls(**fields)
        except ValueError as e:
            raise ValueError(f"bad link spec {text!r}: {e}") from None

    def __str__(self) -> str:
        parts = [f"rtt={_format_duration(self.rtt_s)}", f"rate={_format_rate(self.rate_bits)}"]
        if self.loss:
            parts.append(f"loss={self.loss:g}")
        if self.jitter_s:
            parts.append(f"jitter={_format_duration(self.jitter_s)}")
        parts.append(f"queue={_format_duration(self.queue_s)}")
        return ",".join(parts)


@dataclasses.dataclass(frozen=True)
class HostSpec:
    """One host's access link: every packet it sends crosses its uplink (up_bits), every
    packet it receives its downlink (down_bits), whichever pair it belongs to; 0 is
    unlimited. Each has a drop-tail queue, the time a packet may wait for it at its rate."""

    up_bits: int = 0
    down_bits: int = 0
    up_queue_s: float = _DEFAULT_QUEUE_S
    down_queue_s: float = _DEFAULT_QUEUE_S

    def __post_init__(self) -> None:
        if self.up_bits < 0 or self.down_bits < 0:
            raise ValueError("access rates must not be negative")
        for name, q in (("up", self.up_queue_s), ("down", self.down_queue_s)):
            if not 0 <= q <= 60:
                raise ValueError(f"the {name}link queue must be between 0 and 60 s, got {q}")

    @property
    def limited(self) -> bool:
        return bool(self.up_bits or self.down_bits)

    @classmethod
    def parse(cls, text: str) -> HostSpec:
        """'up=1gbit,down=100mbit,queue=50ms', 'access=1gbit' (up and down alike); every
        key optional; queue applies to both directions, up_queue and down_queue to one."""
        return cls._from_items(text, _items(text, "host spec", _HOST_KEYS, "up=1gbit,down=1gbit,queue=50ms"))

    @classmethod
    def _from_items(cls, text: str, items: Iterator[tuple[str, str]] | list[tuple[str, str]]) -> HostSpec:
        fields: dict[str, Any] = {}
        given = dict(items)
        if "access" in given and ("up" in given or "down" in given):
            raise ValueError(f"bad host spec {text!r}: access sets both up and down; give either")
        try:
            if "access" in given:
                fields["up_bits"] = fields["down_bits"] = _parse_rate(given["access"])
            for key in ("up", "down"):
                if key in given:
                    fields[f"{key}_bits"] = _parse_rate(given[key])
            for key in ("queue", "access_queue"):
                if key in given:
                    fields["up_queue_s"] = fields["down_queue_s"] = parse_duration(given[key])
            for key in ("up_queue", "down_queue"):
                if key in given:
                    fields[f"{key}_s"] = parse_duration(given[key])
        except ValueError as e:
            raise ValueError(f"bad host spec {text!r}: {e}") from None
        try:
            return cls(**fields)
        except ValueError as e:
            raise ValueError(f"bad host spec {text!r}: {e}") from None

    def items(self, queue_key: str = "queue") -> list[str]:
        """The KEY=VALUE items that parse back to this spec (none when unlimited)."""
        if not self.limited:
            return []
        if self.up_bits == self.down_bits:
            parts = [f"access={_format_rate(self.up_bits)}"]
        else:
            parts = [f"up={_format_rate(self.up_bits)}", f"down={_format_rate(self.down_bits)}"]
        if self.up_queue_s == self.down_queue_s:
            if self.up_queue_s != _DEFAULT_QUEUE_S:
                parts.append(f"{queue_key}={_format_duration(self.up_queue_s)}")
        else:  # HostSpec.parse reads these (WanSpec's one access_queue cannot say it)
            parts.append(f"up_queue={_format_duration(self.up_queue_s)}")
            parts.append(f"down_queue={_format_duration(self.down_queue_s)}")
        return parts

    def __str__(self) -> str:
        return ",".join(self.items()) or "access=unlimited"


@dataclasses.dataclass(frozen=True)
class WanSpec:
    """What `--wan SPEC` sets: every directed pair link to `link`, every host's access
    link to `host`. Text: LinkSpec's keys (rtt, rate, loss, jitter, queue: per pair) and
    the host keys up, down, access (= up and down) and access_queue."""

    link: LinkSpec = dataclasses.field(default_factory=LinkSpec)
    host: HostSpec = dataclasses.field(default_factory=HostSpec)

    @classmethod
    def parse(cls, text: str) -> WanSpec:
        """'rtt=100ms,rate=1gbit' (pairs only, as before), 'rtt=100ms,access=1gbit',
        'rtt=50ms,up=100mbit,down=1gbit,access_queue=20ms'."""
        link_items: list[tuple[str, str]] = []
        host_items: list[tuple[str, str]] = []
        example = "rtt=100ms,access=1gbit"
        for key, value in _items(text, "WAN spec", _LINK_KEYS + _WAN_HOST_KEYS, example):
            (host_items if key in _WAN_HOST_KEYS else link_items).append((key, value))
        return cls(LinkSpec._from_items(text, link_items), HostSpec._from_items(text, host_items))

    @property
    def rate_bits(self) -> int:
        """The narrowest rate of the spec (pair, uplink, downlink), 0 if all unlimited: what
        one host's traffic is measured against."""
        rates = [r for r in (self.link.rate_bits, self.host.up_bits, self.host.down_bits) if r]
        return min(rates) if rates else 0

    def __str__(self) -> str:
        return ",".join([str(self.link), *self.host.items(queue_key="access_queue")])


__all__ = ["HostSpec", "LinkSpec", "WanSpec", "parse_duration"]
