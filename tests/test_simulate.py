"""The cache simulator: hand-computed traces for every policy, properties on random traces, and
agreement with the engine's own ExpertCache (the simulator must count what the engine counts)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_colab import RoutingTrace, simulate_cache
from moe_colab.analysis.simulate import POLICIES, hit_ratio_table, simulate_prefetch


def trace_of(*layers, num_experts):
    """layers: per layer a list of per-token expert lists (all the same length top_k)."""
    return RoutingTrace(torch.tensor(layers), num_experts=num_experts)


# Trace A, one layer, top_k=1, cache_size=2:   tokens  0 1 0 2 0 1 2 1
#  LRU   (least recent first)  [0] [0,1] h[1,0] [0,2]ev1 h[2,0] [0,1]ev2 [1,2]ev0 h      -> 3 hits
#  FIFO  (oldest load first)   [0] [0,1] h      [1,2]ev0 [2,0]ev1 [0,1]ev2 [1,2]ev0 h      -> 2 hits
#  LFU   counts after t2: 0:2 1:1 -> t3 ev1; t5 (0:3 2:1) ev2; t6 (0:3 1:2) ev1;
#        t7 (0:3 2:2) ev2; hits at t2, t4                                                  -> 2 hits
#  Belady t3: next use 0->4, 1->5: ev1; t4 hit; t5: 0 never, 2->6: ev0; t6 hit; t7 hit     -> 4 hits
TRACE_A = [[[0], [1], [0], [2], [0], [1], [2], [1]]]
# Trace B, one layer, top_k=1, cache_size=2:   tokens  0 0 0 1 2 0
#  LRU: t4 evicts 0 (older than 1), t5 misses                 hits t1,t2      -> 2 hits
#  FIFO: t4 evicts 0 (loaded first), t5 misses                               -> 2 hits
#  LFU: t4 evicts 1 (1 use vs 3), t5 hits                                    -> 3 hits
#  Belady: t4 evicts 1 (never used again), t5 hits                           -> 3 hits
TRACE_B = [[[0], [0], [0], [1], [2], [0]]]
# Trace C, one layer, top_k=2, E=4, cache_size=3:  tokens {0,1} {2,3} {0,2} {1,3}
#  LRU:  t1 loads 2, then 3 evicts 0 (LRU of 0,1); t2 hit 2, 0 evicts 1; t3 hit 3, 1 evicts 2 -> 2 hits
#  FIFO: same victims (no hit reorders a candidate pair)                                     -> 2 hits
#  LFU:  t1: 0 and 1 used once each, 0 less recent: ev0; t2: 1 (1 use) vs 3 (1 use), 1 older:
#        ev1; t2 hit 2; t3 hit 3, then 1 evicts 2 (2 and 0 both used twice, 2 less recently)  -> 2 hits
#  Belady: t1 ev1 (next use 3 vs 0's 2); t2 hits 0,2; t3 hit 3, then 1 evicts 0 or 2 (never) -> 3 hits
TRACE_C = [[[0, 1], [2, 3], [0, 2], [1, 3]]]

HAND = [
    (TRACE_A, 4, 2, {"lru": 3, "fifo": 2, "lfu": 2, "belady": 4}),
    (TRACE_B, 3, 2, {"lru": 2, "fifo": 2, "lfu": 3, "belady": 3}),
    (TRACE_C, 4, 3, {"lru": 2, "fifo": 2, "lfu": 2, "belady": 3}),
]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("layers,E,size,hits", HAND, ids=["A", "B", "C"])
def test_hand_computed_traces(layers, E, size, hits, policy):
    uses = sum(len(tok) for tok in layers[0])
    r = simulate_cache(trace_of(*layers, num_experts=E), size, policy)
    assert (r["hits"], r["misses"]) == (hits[policy], uses - hits[policy])
    assert r["hit_ratio"] == pytest.approx(hits[policy] / uses)


def test_layers_are_independent_caches():
    # Layer 0 is trace A, layer 1 is A with experts relabelled: the same hits in each layer.
    relabel = [[[3 - e for e in tok] for tok in TRACE_A[0]]]
    r = simulate_cache(trace_of(TRACE_A[0], relabel[0], num_experts=4), 2, "lru")
    assert r["per_layer"]["hits"] == [3, 3]
    assert r["per_layer"]["misses"] == [5, 5]
    assert r["hits"] == 6


def test_cache_smaller_than_top_k_reuses_slots_in_waves():
    # top_k=2, one slot: {0,1} -> 2 misses (1 evicts 0 after 0 ran), {0,1} -> 1 hits, 0 misses.
    r = simulate_cache(trace_of([[0, 1], [0, 1]], num_experts=2), 1, "lru")
    assert (r["hits"], r["misses"]) == (1, 3)


def test_bad_arguments_are_named():
    t = trace_of(TRACE_A[0], num_experts=4)
    for bad in (0, 5, -1):
        with pytest.raises(ValueError, match="cache_size"):
            simulate_cache(t, bad)
    with pytest.raises(TypeError, match="cache_size"):
        simulate_cache(t, 2.0)
    with pytest.raises(ValueError, match="policy"):
        simulate_cache(t, 2, "mru")
    with pytest.raises(TypeError, match="RoutingTrace"):
        simulate_cache(torch.zeros(1, 2, 1, dtype=torch.long), 2)


@st.composite
def traces(draw):
    E = draw(st.integers(2, 6))
    k = draw(st.integers(1, E))
    L = draw(st.integers(1, 2))
    T = draw(st.integers(0, 25))
    rows = [[draw(st.permutations(range(E)))[:k] for _ in range(T)] for _ in range(L)]
    experts = torch.tensor(rows, dtype=torch.long).reshape(L, T, k)
    return RoutingTrace(experts, num_experts=E), draw(st.integers(1, E))


@settings(max_examples=150, deadline=None)
@given(traces())
def test_properties_on_random_traces(case):
    trace, size = case
    L, T, k, E = trace.num_layers, trace.num_tokens, trace.top_k, trace.num_experts
    results = {p: simulate_cache(trace, size, p) for p in POLICIES}
    for r in results.values():
        assert r["hits"] + r["misses"] == L * T * k
        assert sum(r["per_layer"]["hits"]) == r["hits"]
    if size >= k:
        # Belady's offline optimum: never fewer hits than an online policy. (Below top_k the
        # engine runs a token's experts in waves, hits first, so the order of single loads
        # depends on the policy's own state and farthest-next-use is no longer optimal.)
        for p in ("lru", "lfu", "fifo"):
            assert results["belady"]["hits"] >= results[p]["hits"], p
    if size == E:
        distinct = [len(set(trace.experts[l].reshape(-1).tolist())) for l in range(L)]
        for r in results.values():
            assert r["per_layer"]["misses"] == distinct
    if size == k:
        # The cache holds exactly the previous token's experts, whatever the policy.
        sets = [[set(row) for row in layer] for layer in trace.experts.tolist()]
        expected = sum(len(a & b) for layer in sets for a, b in zip(layer, layer[1:]))
        for r in results.values():
            assert r["hits"] == expected


def test_hit_ratio_table_is_monotone_for_belady():
    g = torch.Generator().manual_seed(0)
    experts = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(200)])[None]
    table = hit_ratio_table(RoutingTrace(experts, num_experts=8))
    assert set(table) == set(POLICIES) and all(len(v) == 8 for v in table.values())
    assert all(a <= b for a, b in zip(table["belady"], table["belady"][1:]))


# -- prefetch -------------------------------------------------------------------------------------
def test_prefetch_by_hand():
    # One layer, top_k=1, one slot, tokens 0 1 1; guesses 1 -, 1, 0 (one per token):
    #  t0: prefetch 1 (load), demand 0 misses and evicts the unused prefetch 1 (wasted)
    #  t1: prefetch 1 (load, evicts 0), demand 1 hits (a prefetch hit)
    #  t2: prefetch 0 (load, evicts 1), demand 1 misses and evicts the unused prefetch 0 (wasted)
    t = trace_of([[0], [1], [1]], num_experts=2)
    r = simulate_prefetch(t, torch.tensor([[[1], [1], [0]]]), 1, 1)
    assert (r["hits"], r["misses"], r["prefetches"], r["prefetch_hits"], r["prefetch_wasted"]) == (1, 2, 3, 1, 2)


def test_perfect_guesses_hit_everything_but_nothing_is_free():
    g = torch.Generator().manual_seed(1)
    experts = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(100)])[None]   # [1, T, 2]
    t = RoutingTrace(experts, num_experts=8)
    r = simulate_prefetch(t, experts, 2, 2)
    assert r["misses"] == 0 and r["hits"] == 200
    assert r["prefetches"] == r["prefetch_hits"] == simulate_cache(t, 2)["misses"]
    r0 = simulate_prefetch(t, experts, 4, 0)                       # no prefetch: plain LRU
    assert r0["hits"] == simulate_cache(t, 4, "lru")["hits"] and r0["prefetches"] == 0


@settings(max_examples=60, deadline=None)
@given(traces(), st.data())
def test_simulator_counts_what_the_engine_counts(case, data):
    """Replay the same demands and guesses through moe_colab.engine.cache.ExpertCache on the CPU."""
    from moe_colab.engine.cache import ExpertCache
    from moe_colab.engine.storage import DenseExpertFormat, ExpertStore

    trace, size = case
    L, T, E = trace.num_layers, trace.num_tokens, trace.num_experts
    p = data.draw(st.integers(0, E))
    guesses = torch.tensor([[data.draw(st.permutations(range(E)))[:p] for _ in range(T)] for _ in range(L)],
                           dtype=torch.long).reshape(L, T, p)
    store = ExpertStore(L, E, DenseExpertFormat(4, 4, torch.float32), pin=False)
    cache = ExpertCache(store, size, "cpu")
    for t in range(T):
        for l in range(L):
            cache.prefetch(l, guesses[l, t, :min(p, size)].tolist())
            needed = sorted(trace.experts[l, t].tolist())
            for _ in cache.experts(l, needed):
                pass
    sim = simulate_prefetch(trace, guesses, size, p)
    eng = cache.stats()
    for name in ("hits", "misses", "prefetches", "prefetch_hits", "prefetch_wasted"):
        assert sim[name] == eng[name], name


@settings(max_examples=40, deadline=None)
@given(traces(), st.data())
def test_hit_mask_adds_up_to_the_counts(case, data):
    from moe_colab.analysis.simulate import hit_mask

    trace, size = case
    L, T, E = trace.num_layers, trace.num_tokens, trace.num_experts
    for policy in POLICIES:
        mask = hit_mask(trace, size, policy)
        assert mask.shape == trace.experts.shape
        assert mask.sum(dim=(1, 2)).tolist() == simulate_cache(trace, size, policy)["per_layer"]["hits"]
    p = data.draw(st.integers(1, E))
    guesses = torch.tensor([[data.draw(st.permutations(range(E)))[:p] for _ in range(T)] for _ in range(L)],
                           dtype=torch.long).reshape(L, T, p)
    mask = hit_mask(trace, size, guesses=guesses, prefetch=p)
    assert int(mask.sum()) == simulate_prefetch(trace, guesses, size, p)["hits"]


def test_hit_mask_by_hand():
    # Trace A under LRU with 2 slots: hits at tokens 2, 4 and 7 (see the table above).
    from moe_colab.analysis.simulate import hit_mask
    mask = hit_mask(trace_of(*TRACE_A, num_experts=4), 2, "lru")
    assert mask[0, :, 0].nonzero().reshape(-1).tolist() == [2, 4, 7]
