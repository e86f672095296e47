"""The master's per-epoch choice between the ring and the direct reduce-scatter +
all-gather for larger all-reduces (pccl_py.master.algorithm), as a pure decision and
as Membership applies it: every topology message of an epoch carries the same choice."""

from __future__ import annotations

from typing import Any

import pytest

from pccl_py.config import Config
from pccl_py.errors import ConfigError
from pccl_py.master.algorithm import choose_rsag
from pccl_py.master.membership import Membership, Send
from pccl_py.master.probing import ring_only
from pccl_py.wire import protocol

MIN = 0.002
LOOPBACK, LAN, WAN = 40e-6, 0.4e-3, 0.050
A, B, C, D = 901, 17, 455, 203
T0 = 1000.0


@pytest.mark.parametrize(
    ("rtts", "ring_only_", "min_rtt", "want"),
    [
        ({A: LOOPBACK, B: LOOPBACK, C: LOOPBACK}, False, MIN, False),  # loopback: the ring
        ({A: LAN, B: LAN, C: LAN}, False, MIN, False),  # a LAN: the ring
        ({A: WAN, B: WAN, C: WAN}, False, MIN, True),  # a WAN: rsag
        ({A: LOOPBACK, B: WAN, C: LOOPBACK}, False, MIN, True),  # the master beside A, B far: rsag
        ({A: MIN, B: LOOPBACK, C: LOOPBACK}, False, MIN, True),  # exactly at the threshold
        ({A: MIN * 0.99, B: LOOPBACK, C: LOOPBACK}, False, MIN, False),
        ({A: LOOPBACK, B: LOOPBACK}, False, MIN, True),  # C not measured yet: rsag (safe on a WAN)
        ({A: LOOPBACK, B: None, C: LOOPBACK}, False, MIN, True),
        ({A: WAN, B: WAN, C: WAN}, True, MIN, False),  # a slow pair the ring avoids: the ring
        ({A: LOOPBACK, B: LOOPBACK, C: LOOPBACK}, False, 0.0, True),  # rsag_min_rtt 0: always
    ],
)
def test_choose_rsag(rtts: dict[int, float | None], ring_only_: bool, min_rtt: float, want: bool) -> None:
    choice = choose_rsag([A, B, C], rtts, ring_only_, min_rtt)
    assert choice.rsag is want
    assert choice.reason  # every choice says why


def test_a_single_peer_has_nothing_to_choose() -> None:
    assert choose_rsag([A], {A: LOOPBACK}, False, MIN).rsag is True


def test_the_threshold_is_a_config_field_with_a_checked_range() -> None:
    assert Config().rsag_min_rtt == MIN
    assert Config.from_env({"PCCL_RSAG_MIN_RTT": "0"}).rsag_min_rtt == 0.0
    with pytest.raises(ConfigError):
        Config(rsag_min_rtt=-1.0)


# ---------------------------------------------------------------------- as the master applies it


def _register(m: Membership, pid: int) -> list[Any]:
    return m.register(pid, 0, "127.0.0.1", 20000 + pid, f"peer-{pid}", T0)


def _rsag_sent(effects: list[Any]) -> dict[int, bool]:
    """The `rsag` of the topology message each peer got (each gets at most one)."""
    sent: dict[int, bool] = {}
    for e in effects:
        if isinstance(e, Send) and e.msg["t"] == "topology":
            protocol.validate(e.msg)
            assert e.to not in sent
            sent[e.to] = e.msg["rsag"]
    return sent


def _form(m: Membership, ids: list[int], rtts: dict[int, float]) -> dict[int, bool]:
    """Registers `ids`, notes the measured round trips, admits them in one vote;
    returns what each member was told."""
    for pid in ids:
        _register(m, pid)
        if pid in rtts:
            m.note_rtt(pid, rtts[pid])
    return _rsag_sent(m.vote_topology(ids[0], T0))


def test_the_master_picks_the_ring_on_loopback_and_tells_every_member_alike() -> None:
    m = Membership(1.0, 5.0, 0.2, rsag_min_rtt=MIN)
    sent = _form(m, [A, B, C, D], {A: LOOPBACK, B: LOOPBACK, C: LAN, D: LOOPBACK})
    assert sent == {A: False, B: False, C: False, D: False}


def test_the_master_picks_rsag_when_one_member_is_far() -> None:
    m = Membership(1.0, 5.0, 0.2, rsag_min_rtt=MIN)
    sent = _form(m, [A, B, C, D], {A: LOOPBACK, B: LOOPBACK, C: WAN, D: LOOPBACK})
    assert sent == {A: True, B: True, C: True, D: True}


def test_the_vote_that_admits_peers_waits_for_their_round_trips() -> None:
    # B's round trip decides the new epoch's algorithm: the vote completes when the
    # master has measured it, not before.
    m = Membership(1.0, 5.0, 0.2, rsag_min_rtt=MIN)
    _register(m, A)
    m.note_rtt(A, LOOPBACK)
    _register(m, B)
    assert _rsag_sent(m.vote_topology(A, T0)) == {}
    assert _rsag_sent(m.tick(T0 + 0.5)) == {}
    assert _rsag_sent(m.note_rtt(B, LOOPBACK)) == {A: False, B: False}


def test_a_far_group_admits_a_joiner_without_waiting_for_its_round_trip() -> None:
    # A member far already makes the epoch rsag whatever B's round trip is: the vote
    # completes at once, not a round trip later, and the choice is rsag.
    m = Membership(1.0, 5.0, 0.2, rsag_min_rtt=MIN)
    _register(m, A)
    m.note_rtt(A, WAN)
    _register(m, B)
    assert _rsag_sent(m.vote_topology(A, T0)) == {A: True, B: True}
    assert m.peers[B].measuring  # measured all the same, for the epochs after it


def _vote_admitting_an_unmeasured_joiner() -> Membership:
    """A (measured, on loopback) votes to admit B, whose round trip is not in yet."""
    m = Membership(1.0, 5.0, 0.2, rsag_min_rtt=MIN)
    _register(m, A)
    m.note_rtt(A, LOOPBACK)
    _register(m, B)
    m.vote_topology(A, T0)
    return m


def test_a_member_not_measured_in_time_counts_as_far() -> None:
    m = _vote_admitting_an_unmeasured_joiner()
    assert _rsag_sent(m.tick(T0 + m.rtt_wait)) == {A: True, B: True}  # rsag: safe on a WAN


def test_a_member_that_cannot_be_measured_does_not_hold_the_vote() -> None:
    m = _vote_admitting_an_unmeasured_joiner()
    assert _rsag_sent(m.note_rtt(B, None)) == {A: True, B: True}


def test_without_a_threshold_nothing_waits() -> None:
    m = Membership(1.0, 5.0, 0.2)  # rsag_min_rtt 0: rsag at any round trip, no measurement needed
    _register(m, A)
    _register(m, B)
    assert _rsag_sent(m.vote_topology(A, T0)) == {A: True, B: True}


def test_the_choice_is_made_per_epoch_and_a_joiner_gets_its_epochs() -> None:
    # Epoch of A, B on loopback: the ring. A far joiner C: the next epoch goes rsag, and
    # when C leaves, the epoch after it goes back to the ring.
    m = Membership(1.0, 5.0, 0.2, rsag_min_rtt=MIN)
    assert set(_form(m, [A, B], {A: LOOPBACK, B: LOOPBACK}).values()) == {False}
    _register(m, C)
    m.note_rtt(C, WAN)
    m.vote_topology(A, T0)
    assert _rsag_sent(m.vote_topology(B, T0)) == {A: True, B: True, C: True}
    assert _rsag_sent(m.leave(C, T0)) == {A: False, B: False}


def test_a_member_that_asks_again_hears_the_epochs_choice_not_a_new_one() -> None:
    # The round trips change within an epoch: a topology message of that epoch sent
    # later (a vote that admits nobody) still carries the choice the epoch began with.
    m = Membership(1.0, 5.0, 0.2, rsag_min_rtt=MIN)
    assert set(_form(m, [A, B], {A: LOOPBACK, B: LOOPBACK}).values()) == {False}
    m.note_rtt(B, WAN)
    m.vote_topology(A, T0)
    assert _rsag_sent(m.vote_topology(B, T0)) == {A: False, B: False}


def test_ring_only_still_wins_over_long_round_trips() -> None:
    rates = {(A, B): 100.0, (B, A): 100.0, (A, C): 1.0}
    assert ring_only([A, B, C], rates, 100.0)
    assert choose_rsag([A, B, C], {A: WAN, B: WAN, C: WAN}, True, MIN).rsag is False
