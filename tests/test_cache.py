"""ExpertCache on its own: LRU order, waves when slots are fewer than needed experts,
prefetch rules, statistics, and a consistent state after an interrupt."""
from __future__ import annotations

from contextlib import closing

import pytest
import torch

from moe_colab.engine.cache import ExpertCache
from moe_colab.engine.storage import DenseExpertFormat, ExpertStore

H, I, E = 8, 16, 6


def make_cache(slots, layers=2, device="cpu"):
    store = ExpertStore(layers, E, DenseExpertFormat(H, I, torch.float32), pin=False)
    g = torch.Generator().manual_seed(0)
    for l in range(layers):
        for e in range(E):
            for name, shape in (("w1", (I, H)), ("w2", (H, I)), ("w3", (I, H))):
                store.write(l, e, name, torch.randn(shape, generator=g))
    return ExpertCache(store, slots, torch.device(device))


def consistent(cache):
    """Every slot that claims an expert holds exactly that expert's bytes."""
    for l, lc in enumerate(cache.layers):
        assert set(lc.lru) == {s.expert for s in lc.slots if s.expert is not None}
        for e, slot in lc.lru.items():
            assert torch.equal(slot.buffer.cpu(), cache.store.buffer(l, e))


def run_layer(cache, layer, needed, compute, prefetch=None):
    """Drive one layer as the MoE block does: compute each expert the generator hands over."""
    with closing(cache.experts(layer, needed, prefetch=prefetch)) as ready:
        for expert, views in ready:
            compute(expert, views)


def run(cache, layer, needed):
    seen = []

    def compute(expert, views):
        # The views must show this expert's weights at the moment it computes.
        assert torch.equal(views["w2"], cache.store.views(layer, expert)["w2"].to(views["w2"].device))
        seen.append(expert)

    run_layer(cache, layer, needed, compute)
    return seen


def lru_reference(requests, slots):
    """A second, list-based statement of the cache's rule, for (hits, misses): resident experts
    compute first (ascending), then misses load in ascending order; each expert becomes most
    recently used when it computes; a victim is the least recently used expert that this step
    does not still need (so with fewer slots than needed experts, slots are reused in waves)."""
    resident, hits, misses = [], 0, 0
    for needed in requests:
        hit = [e for e in needed if e in resident]
        todo = [e for e in needed if e not in resident]
        hits, misses = hits + len(hit), misses + len(todo)
        remaining, loaded = set(needed), []

        def issue():
            while todo:
                if len(resident) < slots:
                    resident.append(todo.pop(0))
                else:
                    victim = next((x for x in resident if x not in remaining), None)
                    if victim is None:
                        return
                    resident.remove(victim)
                    resident.append(todo.pop(0))
                loaded.append(resident[-1])

        def compute(e):
            resident.remove(e)
            resident.append(e)
            remaining.discard(e)
            issue()

        issue()
        for e in hit:
            compute(e)
        while loaded:
            compute(loaded.pop(0))
    return hits, misses


def test_lru_eviction_order_by_hand():
    cache = make_cache(slots=2)
    for needed in ([0], [1], [0], [2]):   # 2 evicts 1, the least recently used
        run(cache, 0, needed)
    assert cache.resident(0) == [0, 2]
    s = cache.stats()
    assert (s["hits"], s["misses"]) == (1, 3)


@pytest.mark.parametrize("slots", [1, 2, 3, 6])
def test_matches_reference_lru_on_random_requests(slots):
    g = torch.Generator().manual_seed(slots)
    requests = [sorted(set(torch.randint(0, E, (3,), generator=g).tolist())) for _ in range(80)]
    cache = make_cache(slots)
    for needed in requests:
        assert sorted(run(cache, 0, needed)) == needed
    hits, misses = lru_reference(requests, slots)
    assert (cache.stats()["hits"], cache.stats()["misses"]) == (hits, misses)
    consistent(cache)


def test_hits_compute_before_misses_and_waves_when_slots_are_few():
    cache = make_cache(slots=2)
    run(cache, 0, [4])
    order = run(cache, 0, [1, 3, 4])           # 4 is resident: it computes first
    assert order[0] == 4 and sorted(order) == [1, 3, 4]
    cache1 = make_cache(slots=1)
    assert run(cache1, 0, [0, 2, 5]) == [0, 2, 5]   # one slot reused three times
    assert cache1.stats()["misses"] == 3
    consistent(cache1)


def test_prefetch_never_evicts_another_guess_and_counts():
    cache = make_cache(slots=2)
    cache.prefetch(1, [3, 4, 5])               # only two fit; 5 must not evict 3 or 4
    assert sorted(cache.resident(1)) == [3, 4]
    assert cache.stats()["prefetches"] == 2
    run(cache, 1, [3])                          # used: a prefetch hit
    s = cache.stats()
    assert (s["hits"], s["prefetch_hits"], s["misses"]) == (1, 1, 0)
    run(cache, 1, [0, 1])                       # evicts 4 (never used: wasted) and 3
    s = cache.stats()
    assert s["prefetch_wasted"] == 1 and s["misses"] == 2
    assert s["bytes_to_device"] == 4 * cache.store.nbytes
    consistent(cache)


def test_per_layer_stats_and_reset():
    cache = make_cache(slots=2)
    run(cache, 0, [0, 1])
    run(cache, 1, [2])
    per = cache.stats(per_layer=True)["per_layer"]
    assert [p["misses"] for p in per] == [2, 1]
    cache.reset_stats()
    assert all(v == 0 for k, v in cache.stats().items())


def test_interrupt_mid_layer_leaves_a_consistent_cache():
    cache = make_cache(slots=2)
    run(cache, 0, [0, 1])

    def explode(expert, views):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_layer(cache, 0, [2, 3, 4], explode)
    consistent(cache)
    assert sorted(run(cache, 0, [2, 3])) == [2, 3]   # and it keeps working
    consistent(cache)


def make_swap_cache(slots, layers=2, extra_rows=0, spare_slots=0):
    """A swap-mode cache and, for checking, a copy-mode store with the same experts."""
    fmt = DenseExpertFormat(H, I, torch.float32)
    truth = ExpertStore(layers, E, fmt, pin=False)
    store = ExpertStore(layers, E, fmt, pin=False, device_first=slots, extra_rows=extra_rows)
    cache = ExpertCache(store, slots, torch.device("cpu"), spare_slots=spare_slots)
    g = torch.Generator().manual_seed(1)
    for l in range(layers):
        for e in range(E):
            for name, shape in (("w1", (I, H)), ("w2", (H, I)), ("w3", (I, H))):
                w = torch.randn(shape, generator=g)
                truth.write(l, e, name, w)
                cache.write(l, e, name, w)
    return cache, truth


def swap_consistent(cache, truth):
    """Every expert has a copy (a host row, a slot, or both), every copy holds its bytes, rows and
    owners agree, and each layer keeps exactly experts_on_device slots."""
    for l, lc in enumerate(cache.layers):
        assert len(lc.slots) == cache.experts_on_device
        for e in range(E):
            on_device, row = e in lc.lru, cache.store.home[l][e]
            assert on_device or row is not None, f"layer {l}: expert {e} has no copy"
            if on_device:
                assert torch.equal(lc.lru[e].buffer, truth.buffer(l, e)), (l, e)
            if row is not None:
                assert cache.store.owner[l][row] == e
                assert torch.equal(cache.store.buffer(l, e), truth.buffer(l, e)), (l, e)


@pytest.mark.parametrize("slots", [1, 2, 4])
def test_swap_mode_keeps_one_copy_of_each_expert(slots):
    cache, truth = make_swap_cache(slots)
    assert cache.store.host_bytes == 2 * (E - slots + 1) * cache.store.nbytes
    swap_consistent(cache, truth)
    g = torch.Generator().manual_seed(slots)
    for step in range(50):
        layer = step % 2
        needed = sorted(set(torch.randint(0, E, (3,), generator=g).tolist()))
        seen = []
        run_layer(cache, layer, needed, lambda e, v: seen.append(
            torch.equal(v["w2"], truth.views(layer, e)["w2"])))
        assert all(seen) and len(seen) == len(needed)
        if step % 7 == 0:
            cache.prefetch(1 - layer, [int(x) for x in torch.randint(0, E, (2,), generator=g)])
        swap_consistent(cache, truth)
    s = cache.stats()
    assert s["bytes_to_host"] > 0
    with pytest.raises(KeyboardInterrupt):
        run_layer(cache, 0, [0, 1, 2, 3, 4, 5], lambda e, v: (_ for _ in ()).throw(KeyboardInterrupt))
    swap_consistent(cache, truth)


def test_swap_mode_skips_write_backs_of_experts_that_kept_their_host_row():
    """An expert loaded from its host row keeps that row as a valid copy until the row is needed:
    evicting it then costs no write-back. Extra host rows keep more such copies; spare slots let
    a load start before the write-back that made room (swap mode's two streams on a GPU)."""
    g = torch.Generator().manual_seed(3)
    requests = [sorted(set(torch.randint(0, E, (2,), generator=g).tolist())) for _ in range(60)]
    written_back = {}
    for extra, spare in ((0, 0), (0, 2), (3, 0), (3, 2)):
        cache, truth = make_swap_cache(2, layers=2, extra_rows=extra, spare_slots=spare)
        assert [b.shape[0] for b in cache.store.buffers] == [min(E, E - 2 + 1 + extra // 2 + (l < extra % 2))
                                                            for l in range(2)]
        for step, needed in enumerate(requests):
            seen = []
            run_layer(cache, step % 2, needed, lambda e, v: seen.append(
                torch.equal(v["w2"], truth.views(step % 2, e)["w2"])))
            assert all(seen) and len(seen) == len(needed)
            swap_consistent(cache, truth)
        s = cache.stats()
        written_back[(extra, spare)] = s["bytes_to_host"] // cache.store.nbytes
        assert written_back[(extra, spare)] < s["misses"]        # some evictions cost nothing
    assert written_back[(3, 0)] < written_back[(0, 0)]           # more rows: fewer write-backs
    assert written_back[(0, 2)] == written_back[(0, 0)]          # spare slots change when, not what


def test_prefetch_queue_drops_unlikely_guesses():
    """With the next router's probabilities, a guess below min_prob, or no more likely than the
    expert it would evict, is not copied; unscored guesses are all copied (as before)."""
    fmt = DenseExpertFormat(H, I, torch.float32)
    store = ExpertStore(1, E, fmt, pin=False)
    for e in range(E):
        for name, shape in (("w1", (I, H)), ("w2", (H, I)), ("w3", (I, H))):
            store.write(0, e, name, torch.randn(shape))
    cache = ExpertCache(store, 2, torch.device("cpu"), min_prob=0.05)
    run_layer(cache, 0, [0, 1], lambda e, v: None)              # 0 and 1 resident
    p = [0.30, 0.30, 0.02, 0.30, 0.04, 0.04]
    cache.prefetch(0, [3, 2], p)                                  # 3 evicts 0 (0.30 vs 0.30: no)
    assert sorted(cache.resident(0)) == [0, 1] and cache.stats()["prefetches"] == 0
    p = [0.10, 0.30, 0.02, 0.50, 0.04, 0.04]
    cache.prefetch(0, [3, 2], p)                                  # 3 (0.50) evicts 0 (0.10); 2 < min_prob
    assert sorted(cache.resident(0)) == [1, 3] and cache.stats()["prefetches"] == 1
    cache.prefetch(0, [4, 5])                                     # no scores: copied as guessed
    assert sorted(cache.resident(0)) == [4, 5] and cache.stats()["prefetches"] == 3
