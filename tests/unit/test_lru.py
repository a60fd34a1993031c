"""`runtime.lru.FairLRU`: the bounded map behind the grammar cache and prompt lookup's history
(docs/security.md, "Bounded state"): entry and cost bounds, least recently used first, and
eviction from the tenant holding the most, so one tenant's flood never evicts another's share."""

from __future__ import annotations

import pytest

from prefixport.runtime.lru import FairLRU


def test_bounds_hold_and_the_least_recent_goes_first():
    lru: FairLRU[str, int] = FairLRU(max_entries=3)
    for i, key in enumerate("abc"):
        lru.put(key, i)
    assert lru.get("a") == 0  # now the most recent
    lru.put("d", 3)
    assert lru.get("b") is None and [lru.get(k) for k in "acd"] == [0, 2, 3]
    stats = lru.stats()
    assert (stats.entries, stats.evictions, stats.max_entries) == (3, 1, 3)


def test_a_cost_bound_counts_each_entry_and_refuses_one_over_it_alone():
    lru: FairLRU[str, str] = FairLRU(max_entries=100, max_cost=10)
    lru.put("a", "x", cost=4)
    lru.put("b", "y", cost=4)
    lru.put("c", "z", cost=4)  # 12 > 10: "a" goes
    assert lru.get("a") is None and lru.stats().cost == 8
    lru.put("huge", "w", cost=11)
    assert lru.get("huge") is None and lru.stats().cost == 8
    lru.put("b", "y2", cost=1)  # a replaced entry's cost is its new one
    assert lru.get("b") == "y2" and lru.stats().cost == 5


def test_a_flooding_tenant_evicts_its_own_entries_not_others():
    lru: FairLRU[str, int] = FairLRU(max_entries=10)
    for i in range(3):
        lru.put(f"quiet{i}", i, owner="quiet")
    for i in range(500):
        lru.put(f"flood{i}", i, owner="flood")
        assert len(lru) <= 10
    assert all(lru.get(f"quiet{i}") == i for i in range(3))
    assert [lru.get(f"flood{i}") for i in range(493, 500)] == list(range(493, 500))
    assert lru.stats().owners == 2 and lru.stats().evictions == 493


def test_a_newcomer_takes_from_the_biggest_holder_then_shares_are_even():
    lru: FairLRU[str, int] = FairLRU(max_entries=4)
    for i in range(4):
        lru.put(f"a{i}", i, owner="a")
    lru.put("b0", 0, owner="b")  # a holds the most: a's least recent goes
    assert lru.get("a0") is None and lru.get("b0") == 0
    lru.put("b1", 1, owner="b")
    lru.put("b2", 2, owner="b")  # now a 2, b 3 after the put: b's own least recent goes
    assert [lru.get(k) for k in ("a2", "a3", "b1", "b2")] == [2, 3, 1, 2] and lru.get("b0") is None


def test_drop_removes_matching_keys():
    lru: FairLRU[tuple[str, str], int] = FairLRU(max_entries=10)
    lru.put(("gone", "s1"), 1, owner="t")
    lru.put(("gone", "s2"), 2, owner="u")
    lru.put(("kept", "s1"), 3, owner="t")
    assert lru.drop(lambda key: key[0] == "gone") == 2
    assert len(lru) == 1 and lru.stats().owners == 1 and lru.get(("kept", "s1")) == 3
    with pytest.raises(ValueError):
        FairLRU(max_entries=0)
