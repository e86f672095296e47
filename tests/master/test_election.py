"""Unit tests of the shared-state election (pccl_py.election.elect): a pure function of
the peers' submissions, the group's last synced revision and who took part in it.

Contract (DESIGN.md §5, PCCL semantics):
- per entry, the content held by most voters wins; ties go to content held by a peer
  of the last sync, then to the lowest peer id holding it;
- if any peer is SEND_ONLY, the SEND_ONLY peers alone vote and must agree;
  RECEIVE_ONLY peers never vote; a group of RECEIVE_ONLY peers only is an error;
- every peer lists the same entries (names, order, dtype, shape); a difference is an
  error naming the peer;
- after the group synced revision G, a peer that took part must come with G + 1;
  a joiner may come with any revision and adopts the group's; the first sync takes
  the highest voter revision; the group revision never goes backwards;
- a peer fetches exactly the entries whose bytes differ from the winner (SEND_ONLY
  peers never fetch); the holders of an entry are exactly the peers with its bytes;
- after the sync every peer holds the elected bytes: nobody keeps different content.
"""

from __future__ import annotations

import itertools

import pytest

from pccl_py.master.election import Election, ElectionError, EntryMeta, Submission, SyncStrategy, elect

EP = SyncStrategy.ENFORCE_POPULAR
SO = SyncStrategy.SEND_ONLY
RO = SyncStrategy.RECEIVE_ONLY

# The default layout: three float32 entries of different shapes.
LAYOUT: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("weights", "float32", (4, 8)),
    ("bias", "float32", (8,)),
    ("step", "int64", (1,)),
)
_ITEM = {"float32": 4, "int32": 4, "int64": 8, "float16": 2, "bfloat16": 2, "uint8": 1}


def entries(hashes: tuple[int, ...], layout: tuple[tuple[str, str, tuple[int, ...]], ...] = LAYOUT) -> tuple[EntryMeta, ...]:
    assert len(hashes) == len(layout)
    out = []
    for (name, dtype, shape), h in zip(layout, hashes, strict=True):
        n = 1
        for d in shape:
            n *= d
        out.append(EntryMeta(name, dtype, shape, n * _ITEM[dtype], h))
    return tuple(out)


def sub(peer: int, hashes: tuple[int, ...], revision: int = 0, strategy: SyncStrategy = EP, layout=LAYOUT) -> Submission:
    return Submission(peer, revision, strategy, entries(hashes, layout))


A = (0xA1, 0xA2, 0xA3)  # content A, per entry
B = (0xB1, 0xB2, 0xB3)  # content B, differs from A in every entry


def check_consistency(result: Election, subs: list[Submission]) -> None:
    """Invariants every election must satisfy: fetch sets are exactly the differing
    entries (SEND_ONLY peers excepted), holders exactly the peers with the elected
    bytes (sorted, non-empty), and after the transfer every peer holds the winner."""
    n = len(subs[0].entries)
    assert len(result.hashes) == n and len(result.holders) == n
    by_peer = {s.peer: s for s in subs}
    for s in subs:
        differing = tuple(i for i in range(n) if s.entries[i].hash != result.hashes[i])
        if s.strategy is SO:
            assert s.peer not in result.fetch, f"SEND_ONLY peer {s.peer} must never fetch"
            assert not differing, f"SEND_ONLY peer {s.peer} keeps content that differs from the elected one"
        else:
            assert result.fetch.get(s.peer, ()) == differing, (s.peer, result.fetch, differing)
    assert all(v for v in result.fetch.values()), "a peer with nothing to fetch must not appear in fetch"
    for i in range(n):
        expected = tuple(sorted(p for p, s in by_peer.items() if s.entries[i].hash == result.hashes[i]))
        assert tuple(sorted(result.holders[i])) == expected
        assert result.holders[i], f"nobody holds the elected content of entry {i}"
        for p in result.holders[i]:
            assert p not in result.fetch or i not in result.fetch[p]


# ---------------------------------------------------------------------- popularity


def test_identical_content_moves_nothing() -> None:
    subs = [sub(p, A, revision=3) for p in (5, 1, 9, 2)]
    result = elect(subs, None, set())
    assert result.revision == 3
    assert result.hashes == A
    assert result.fetch == {}
    assert result.holders == ((1, 2, 5, 9),) * 3
    check_consistency(result, subs)


def test_most_popular_content_wins_per_entry() -> None:
    # Entry 0: A by 3 peers vs B by 1; entry 1: B by 3 vs A by 1; entry 2: all agree.
    subs = [
        sub(1, (A[0], B[1], A[2])),
        sub(2, (A[0], B[1], A[2])),
        sub(3, (B[0], A[1], A[2])),
        sub(4, (A[0], B[1], A[2])),
    ]
    result = elect(subs, None, set())
    assert result.hashes == (A[0], B[1], A[2])
    assert result.fetch == {3: (0, 1)}
    assert result.holders == ((1, 2, 4), (1, 2, 4), (1, 2, 3, 4))
    check_consistency(result, subs)


def test_popular_beats_lower_id_and_last_synced() -> None:
    # Peer 1 has the lowest id, and every peer took part in the last sync: count wins.
    subs = [sub(1, B, revision=5), sub(2, A, revision=5), sub(3, A, revision=5)]
    result = elect(subs, 4, {1, 2, 3})
    assert result.revision == 5
    assert result.hashes == A
    assert result.fetch == {1: (0, 1, 2)}
    check_consistency(result, subs)


def test_tie_goes_to_content_held_by_a_peer_of_the_last_sync() -> None:
    # 2 vs 2; only content B (higher ids) is held by a peer of the last sync.
    subs = [sub(1, A, 1), sub(2, A, 1), sub(3, B, 1), sub(4, B, 1)]
    result = elect(subs, 0, {4})
    assert result.hashes == B
    assert result.fetch == {1: (0, 1, 2), 2: (0, 1, 2)}
    assert result.holders == ((3, 4),) * 3
    check_consistency(result, subs)


def test_tie_without_last_sync_goes_to_lowest_peer_id() -> None:
    subs = [sub(7, A), sub(3, B), sub(9, A), sub(4, B)]
    result = elect(subs, None, set())
    assert result.hashes == B  # held by peer 3, the lowest id
    assert result.fetch == {7: (0, 1, 2), 9: (0, 1, 2)}
    check_consistency(result, subs)


def test_tie_with_last_sync_holders_on_both_sides_goes_to_lowest_peer_id() -> None:
    subs = [sub(7, A, 2), sub(3, B, 2), sub(9, A, 2), sub(4, B, 2)]
    result = elect(subs, 1, {3, 4, 7, 9})
    assert result.hashes == B
    subs = [sub(2, A, 2), sub(3, B, 2)]
    assert elect(subs, 1, {2, 3}).hashes == A


def test_input_order_does_not_matter() -> None:
    subs = [sub(1, A), sub(2, (A[0], B[1], B[2])), sub(3, (B[0], B[1], A[2])), sub(4, B), sub(5, (A[0], A[1], B[2]))]
    reference = elect(subs, None, set())
    for perm in itertools.permutations(subs):
        assert elect(list(perm), None, set()) == reference
    check_consistency(reference, subs)


# ---------------------------------------------------------------------- strategies


def test_send_only_minority_wins() -> None:
    subs = [sub(1, A), sub(2, A), sub(3, A), sub(4, B, strategy=SO)]
    result = elect(subs, None, set())
    assert result.hashes == B
    assert result.fetch == {1: (0, 1, 2), 2: (0, 1, 2), 3: (0, 1, 2)}
    assert result.holders == ((4,),) * 3
    check_consistency(result, subs)


def test_send_only_decides_revision_of_first_sync() -> None:
    subs = [sub(1, A, revision=9), sub(2, B, revision=4, strategy=SO)]
    result = elect(subs, None, set())
    assert result.revision == 4
    assert result.hashes == B


def test_several_send_only_peers_that_agree() -> None:
    subs = [sub(1, A, 2), sub(2, B, 2, SO), sub(3, B, 2, SO), sub(4, A, 2)]
    result = elect(subs, None, set())
    assert result.hashes == B
    assert result.fetch == {1: (0, 1, 2), 4: (0, 1, 2)}
    assert result.holders == ((2, 3),) * 3
    check_consistency(result, subs)


def test_send_only_disagreement_is_an_error() -> None:
    subs = [sub(1, A, strategy=SO), sub(2, (A[0], A[1], B[2]), strategy=SO), sub(3, A)]
    with pytest.raises(ElectionError, match="SEND_ONLY"):
        elect(subs, None, set())


def test_send_only_disagreement_at_different_revisions_is_an_error() -> None:
    """BUG (kept failing): two SEND_ONLY peers with different content and different
    revisions. Only the peers at the target revision count, the other SEND_ONLY peer
    never fetches, so the sync "succeeds" with diverging state."""
    subs = [sub(1, A, revision=3, strategy=SO), sub(2, B, revision=5, strategy=SO), sub(3, B, revision=5)]
    try:
        result = elect(subs, None, set())
    except ElectionError:
        return
    check_consistency(result, subs)  # fails: peer 1 keeps A while B is elected


def test_send_only_never_fetches_even_when_others_agree_on_more() -> None:
    subs = [sub(1, A, strategy=SO), sub(2, B), sub(3, B), sub(4, B), sub(5, B, strategy=RO)]
    result = elect(subs, None, set())
    assert 1 not in result.fetch
    assert set(result.fetch) == {2, 3, 4, 5}
    check_consistency(result, subs)


def test_receive_only_never_votes() -> None:
    # Three RECEIVE_ONLY peers with B cannot outvote one ENFORCE_POPULAR peer with A.
    subs = [sub(1, B, strategy=RO), sub(2, B, strategy=RO), sub(3, B, strategy=RO), sub(4, A)]
    result = elect(subs, None, set())
    assert result.hashes == A
    assert result.fetch == {1: (0, 1, 2), 2: (0, 1, 2), 3: (0, 1, 2)}
    assert result.holders == ((4,),) * 3
    check_consistency(result, subs)


def test_receive_only_peer_with_the_winning_bytes_fetches_nothing_and_can_serve() -> None:
    subs = [sub(1, A), sub(2, (A[0], B[1], A[2]), strategy=RO)]
    result = elect(subs, None, set())
    assert result.fetch == {2: (1,)}
    assert result.holders == ((1, 2), (1,), (1, 2))
    check_consistency(result, subs)


def test_all_receive_only_is_an_error() -> None:
    with pytest.raises(ElectionError, match="RECEIVE_ONLY"):
        elect([sub(1, A, strategy=RO), sub(2, A, strategy=RO)], None, set())
    with pytest.raises(ElectionError):
        elect([sub(1, A, strategy=RO)], 3, {1})


def test_no_submissions_is_an_error() -> None:
    with pytest.raises(ElectionError):
        elect([], None, set())


def test_single_peer() -> None:
    result = elect([sub(1, A, revision=7)], None, set())
    assert result == Election(7, A, {}, ((1,),) * 3)


# ---------------------------------------------------------------------- layout


def _layout_variants() -> list[tuple[str, tuple[tuple[str, str, tuple[int, ...]], ...]]]:
    renamed = (("weights", "float32", (4, 8)), ("bias2", "float32", (8,)), ("step", "int64", (1,)))
    retyped = (("weights", "int32", (4, 8)), ("bias", "float32", (8,)), ("step", "int64", (1,)))  # same nbytes
    reshaped = (("weights", "float32", (8, 4)), ("bias", "float32", (8,)), ("step", "int64", (1,)))  # same nbytes
    resized = (("weights", "float32", (4, 9)), ("bias", "float32", (8,)), ("step", "int64", (1,)))
    reordered = (("bias", "float32", (8,)), ("weights", "float32", (4, 8)), ("step", "int64", (1,)))
    return [("name", renamed), ("dtype", retyped), ("shape", reshaped), ("size", resized), ("order", reordered)]


@pytest.mark.parametrize("what,layout", _layout_variants(), ids=[v[0] for v in _layout_variants()])
def test_layout_mismatch_is_an_error_naming_the_peer(what: str, layout) -> None:
    subs = [sub(1, A), sub(2, A), sub(3, A, layout=layout), sub(4, A)]
    with pytest.raises(ElectionError) as info:
        elect(subs, None, set())
    assert info.value.peer == 3
    assert "peer 3" in str(info.value)


@pytest.mark.parametrize("count", [2, 4])
def test_entry_count_mismatch_is_an_error_naming_the_peer(count: int) -> None:
    layout = (LAYOUT + (("extra", "uint8", (3,)),))[:count]
    subs = [sub(1, A), sub(2, (A + (0xEE,))[:count], layout=layout), sub(3, A)]
    with pytest.raises(ElectionError) as info:
        elect(subs, None, set())
    assert info.value.peer == 2
    assert "peer 2" in str(info.value)


def test_layout_of_receive_only_peers_is_checked_too() -> None:
    reshaped = _layout_variants()[2][1]
    with pytest.raises(ElectionError) as info:
        elect([sub(1, A), sub(2, A, strategy=RO, layout=reshaped)], None, set())
    assert info.value.peer == 2


def test_layout_mismatch_error_names_both_peers_even_if_the_odd_one_is_the_lowest_id() -> None:
    reshaped = _layout_variants()[2][1]
    subs = [sub(1, A, layout=reshaped), sub(2, A), sub(3, A)]
    with pytest.raises(ElectionError) as info:
        elect(subs, None, set())
    assert "peer 1" in str(info.value) and "peer 2" in str(info.value)


# ---------------------------------------------------------------------- revisions


def test_first_sync_takes_the_highest_voter_revision() -> None:
    subs = [sub(1, A, revision=2), sub(2, B, revision=6), sub(3, A, revision=4)]
    result = elect(subs, None, set())
    assert result.revision == 6
    # Only voters at the target revision count: peer 2's B wins although A has 2 holders.
    assert result.hashes == B
    assert result.fetch == {1: (0, 1, 2), 3: (0, 1, 2)}
    check_consistency(result, subs)


def test_first_sync_ignores_receive_only_revisions() -> None:
    subs = [sub(1, A, revision=2), sub(2, B, revision=50, strategy=RO)]
    result = elect(subs, None, set())
    assert result.revision == 2
    assert result.hashes == A


def test_peers_of_the_last_sync_advance_by_one() -> None:
    subs = [sub(1, A, revision=8), sub(2, A, revision=8), sub(3, B, revision=8)]
    result = elect(subs, 7, {1, 2, 3})
    assert result.revision == 8
    assert result.hashes == A
    assert result.fetch == {3: (0, 1, 2)}


@pytest.mark.parametrize("bad_revision", [7, 9, 0, -1, 100])
def test_peer_of_the_last_sync_with_wrong_revision_is_an_error(bad_revision: int) -> None:
    subs = [sub(1, A, revision=8), sub(2, A, revision=bad_revision), sub(3, A, revision=8)]
    with pytest.raises(ElectionError) as info:
        elect(subs, 7, {1, 2, 3})
    assert info.value.peer == 2
    message = str(info.value)
    assert "peer 2" in message and "revision" in message and str(bad_revision) in message


def test_wrong_revision_is_an_error_even_with_identical_content() -> None:
    subs = [sub(1, A, revision=1), sub(2, A, revision=1)]
    with pytest.raises(ElectionError):
        elect(subs, 1, {1, 2})  # nobody bumped


@pytest.mark.parametrize("joiner_revision", [0, 3, 8, 9, 1000])
def test_joiner_with_any_revision_adopts_the_group_revision(joiner_revision: int) -> None:
    subs = [sub(1, A, revision=8), sub(2, A, revision=8), sub(3, B, revision=joiner_revision)]
    result = elect(subs, 7, {1, 2})
    assert result.revision == 8
    assert result.hashes == A
    assert result.fetch == {3: (0, 1, 2)}
    check_consistency(result, subs)


def test_stale_joiners_do_not_outvote_the_peers_of_the_last_sync() -> None:
    # Three ENFORCE_POPULAR joiners with B at an old revision; one synced peer with A.
    subs = [sub(1, A, revision=8), sub(2, B, revision=2), sub(3, B, revision=2), sub(4, B, revision=2)]
    result = elect(subs, 7, {1})
    assert result.revision == 8
    assert result.hashes == A
    assert set(result.fetch) == {2, 3, 4}
    check_consistency(result, subs)


def test_receive_only_joiner_with_any_revision() -> None:
    subs = [sub(1, A, revision=4), sub(2, (0, 0, 0), revision=0, strategy=RO)]
    result = elect(subs, 3, {1})
    assert result.revision == 4
    assert result.fetch == {2: (0, 1, 2)}
    assert result.holders == ((1,),) * 3


def test_group_revision_never_goes_backwards_with_a_send_only_joiner() -> None:
    """BUG (kept failing): the group synced revision 6; peer 2 (of that sync) comes
    with 7 as it must, a SEND_ONLY joiner comes with revision 3. Since only SEND_ONLY
    peers vote and none is at 7, the election falls back to "nobody from the last
    sync is left" and moves the group (and peer 2) back to revision 3."""
    subs = [sub(1, B, revision=3, strategy=SO), sub(2, A, revision=7)]
    try:
        result = elect(subs, 6, {2})
    except ElectionError:
        return
    assert result.revision >= 7, f"group revision went back from 6 to {result.revision}"


def test_when_nobody_of_the_last_sync_is_left_the_freshest_voters_decide() -> None:
    # Documented fallback: the whole last-sync group is gone.
    subs = [sub(1, A, revision=3), sub(2, B, revision=5)]
    result = elect(subs, 9, {7, 8})
    assert result.hashes == B
    assert result.fetch == {1: (0, 1, 2)}
    check_consistency(result, subs)


# ---------------------------------------------------------------------- fetch sets


def test_fetch_sets_contain_exactly_the_differing_entries() -> None:
    subs = [
        sub(10, A),
        sub(11, A),
        sub(12, A),
        sub(13, (B[0], A[1], A[2])),
        sub(14, (A[0], A[1], B[2])),
        sub(15, B, strategy=RO),
        sub(16, (A[0], B[1], A[2]), strategy=RO),
    ]
    result = elect(subs, None, set())
    assert result.hashes == A
    assert result.fetch == {13: (0,), 14: (2,), 15: (0, 1, 2), 16: (1,)}
    assert result.holders == ((10, 11, 12, 14, 16), (10, 11, 12, 13, 14), (10, 11, 12, 13, 16))
    check_consistency(result, subs)


def test_randomised_invariants() -> None:
    import random

    rng = random.Random(1234)
    for _ in range(400):
        n = rng.randint(1, 6)
        strategies = [rng.choice([EP, EP, EP, RO, SO]) for _ in range(n)]
        peers = rng.sample(range(1, 50), n)
        group_rev = rng.choice([None, 3])
        subs = []
        shared_so = tuple(rng.randint(1, 3) for _ in LAYOUT)
        for p, s in zip(peers, strategies, strict=True):
            hashes = shared_so if s is SO else tuple(rng.randint(1, 3) for _ in LAYOUT)
            rev = 4 if group_rev is not None else rng.randint(0, 2)
            if s is SO:
                rev = 4 if group_rev is not None else 2
            subs.append(sub(p, hashes, revision=rev, strategy=s))
        last = set(rng.sample(peers, rng.randint(0, n))) if group_rev is not None else set()
        try:
            result = elect(subs, group_rev, last)
        except ElectionError:
            assert all(s is RO for s in strategies)
            continue
        check_consistency(result, subs)
        voters = [s for s in subs if s.strategy is SO] or [s for s in subs if s.strategy is not RO]
        assert result.revision == (group_rev + 1 if group_rev is not None else max(s.revision for s in voters))
        for i in range(len(LAYOUT)):
            counts: dict[int, int] = {}
            for s in voters:
                if s.revision == result.revision:
                    counts[s.entries[i].hash] = counts.get(s.entries[i].hash, 0) + 1
            assert counts[result.hashes[i]] == max(counts.values())
