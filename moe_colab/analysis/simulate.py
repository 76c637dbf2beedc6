"""Replay a routing trace through a per-layer expert cache and count hits and misses.

The simulated cache follows moe_colab's ExpertCache (cache.py), one cache per layer:

    for each token t (in order), layer l needs the set S = trace.experts[l, t] (top_k experts)
      hits    experts of S already resident                 (used first, ascending expert id)
      misses  the others, each loaded into a slot           (ascending expert id)
              a full cache evicts one resident expert chosen by the policy, never one that
              this token still needs; with cache_size < top_k the token's own experts that
              already ran may be evicted (slots are reused in waves, as the engine does)

    hits + misses = layers * tokens * top_k uses; caches start empty.

Policies (the victim among the evictable residents):
    "lru"     least recently used
    "lfu"     fewest uses so far in the whole trace (resident or not), ties: least recent
    "fifo"    loaded earliest (hits do not refresh)
    "belady"  next use farthest in the future, never-again first (offline optimum for
              cache_size >= top_k; needs the future, so it bounds what an online policy can
              reach. Below top_k a token's experts run in waves, hits first, so the order of
              single loads depends on the policy's own state and it is only a heuristic)

``simulate_prefetch`` adds speculative loading in front of LRU: before layer l runs at token t,
the guessed experts of layer l (made from layer l-1's hidden state) are loaded.

Reference: Eliseev & Mazur, arXiv 2312.17238, section 3.1 and Figure 2 (left: LRU hit ratio).
Belady, "A study of replacement algorithms for a virtual-storage computer", IBM Syst. J. 1966.
"""
from __future__ import annotations

from bisect import bisect_right

import torch

from .routing import RoutingTrace

POLICIES = ("lru", "lfu", "fifo", "belady")
_NEVER = float("inf")


def _check(trace, cache_size: int, policy: str = "lru") -> None:
    if not isinstance(trace, RoutingTrace):
        raise TypeError(f"expected a RoutingTrace, got {type(trace).__name__}")
    if isinstance(cache_size, bool) or not isinstance(cache_size, int):
        raise TypeError(f"cache_size must be an int, got {cache_size!r}")
    if not 1 <= cache_size <= trace.num_experts:
        raise ValueError(f"cache_size={cache_size} is outside 1..{trace.num_experts} "
                         f"(the trace has {trace.num_experts} experts per layer)")
    if policy not in POLICIES:
        raise ValueError(f"unknown cache policy {policy!r}; choose one of {list(POLICIES)}")


def _layer_requests(trace: RoutingTrace) -> list[list[list[int]]]:
    """[layer][token] -> the token's experts, ascending (the order the engine runs them)."""
    return [[sorted(row) for row in layer] for layer in trace.experts.tolist()]


class _LayerCache:
    """Resident experts of one layer plus what each policy needs to pick a victim."""

    def __init__(self, size: int, policy: str, requests: list[list[int]]):
        self.size, self.policy = size, policy
        self.resident: set[int] = set()
        self.last_use: dict[int, int] = {}     # stamp of the latest use (lru, lfu ties)
        self.loaded_at: dict[int, int] = {}    # stamp of the load (fifo)
        self.uses: dict[int, int] = {}         # uses so far (lfu)
        self.clock = 0
        self.t = 0                             # current token (belady)
        self.positions: dict[int, list[int]] = {}  # expert -> tokens that use it (belady)
        for t, row in enumerate(requests):
            for e in row:
                self.positions.setdefault(e, []).append(t)

    def next_use(self, e: int) -> float:
        pos = self.positions.get(e, [])
        i = bisect_right(pos, self.t)            # first use strictly after the current token
        return pos[i] if i < len(pos) else _NEVER

    def victim(self, candidates) -> int:
        p = self.policy
        if p == "lru":
            key = lambda e: self.last_use[e]                                   # noqa: E731
        elif p == "fifo":
            key = lambda e: self.loaded_at[e]                                  # noqa: E731
        elif p == "lfu":
            key = lambda e: (self.uses[e], self.last_use[e])                   # noqa: E731
        else:   # belady: the largest next use; ties (never again) go to the smallest id
            key = lambda e: (-self.next_use(e), e)                             # noqa: E731
        return min(candidates, key=key)

    def touch(self, e: int) -> None:
        self.clock += 1
        self.last_use[e] = self.clock
        self.uses[e] = self.uses.get(e, 0) + 1

    def load(self, e: int, protected) -> int | None:
        """Make e resident; return the evicted expert (or None)."""
        evicted = None
        if len(self.resident) >= self.size:
            candidates = self.resident - set(protected)
            evicted = self.victim(candidates)
            self.resident.discard(evicted)
        self.clock += 1
        self.loaded_at[e] = self.clock
        self.resident.add(e)
        return evicted

    def step(self, t: int, needed: list[int]) -> tuple[int, int]:
        """One token's demand: (hits, misses)."""
        self.t = t
        hits = [e for e in needed if e in self.resident]
        misses = [e for e in needed if e not in self.resident]
        for e in hits:
            self.touch(e)
        for i, e in enumerate(misses):
            # Protect what this token still needs; if the cache is smaller than top_k that
            # leaves nothing, so the experts that already ran become evictable.
            protected = needed if len(self.resident - set(needed)) > 0 else misses[i:]
            self.load(e, protected)
            self.touch(e)
        return len(hits), len(misses)


def _summary(per_hits: list[int], per_misses: list[int], **extra) -> dict:
    hits, misses = sum(per_hits), sum(per_misses)
    ratio = lambda h, m: h / (h + m) if h + m else 0.0  # noqa: E731
    return {"hits": hits, "misses": misses, "uses": hits + misses, "hit_ratio": ratio(hits, misses),
            **extra,
            "per_layer": {"hits": per_hits, "misses": per_misses,
                          "hit_ratio": [ratio(h, m) for h, m in zip(per_hits, per_misses)]}}


def simulate_cache(trace: RoutingTrace, cache_size: int, policy: str = "lru") -> dict:
    """Replay ``trace`` through per-layer caches of ``cache_size`` experts.

    Returns {"hits", "misses", "uses", "hit_ratio", "policy", "cache_size",
             "per_layer": {"hits": [L], "misses": [L], "hit_ratio": [L]}}.
    """
    _check(trace, cache_size, policy)
    per_hits, per_misses = [], []
    for requests in _layer_requests(trace):
        cache = _LayerCache(cache_size, policy, requests)
        h = m = 0
        for t, needed in enumerate(requests):
            dh, dm = cache.step(t, needed)
            h, m = h + dh, m + dm
        per_hits.append(h)
        per_misses.append(m)
    return _summary(per_hits, per_misses, policy=policy, cache_size=cache_size)


def hit_ratio_table(trace: RoutingTrace, policies=POLICIES, sizes=None) -> dict[str, list[float]]:
    """{policy: [hit ratio for cache_size in sizes]} (sizes default 1..num_experts)."""
    sizes = list(sizes or range(1, trace.num_experts + 1))
    return {p: [simulate_cache(trace, s, p)["hit_ratio"] for s in sizes] for p in policies}


def _check_guesses(trace: RoutingTrace, guesses, prefetch: int) -> torch.Tensor:
    guesses = torch.as_tensor(guesses).long()
    L, T = trace.num_layers, trace.num_tokens
    if guesses.dim() != 3 or tuple(guesses.shape[:2]) != (L, T):
        raise ValueError(f"guesses must be [layers={L}, tokens={T}, n], got {tuple(guesses.shape)}")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or not 0 <= prefetch <= guesses.shape[2]:
        raise ValueError(f"prefetch={prefetch!r} must be an int in 0..{guesses.shape[2]} (guesses per token)")
    if guesses.numel() and int(guesses.max()) >= trace.num_experts:
        raise ValueError(f"guesses name expert {int(guesses.max())}; the trace has {trace.num_experts}")
    return guesses


def _replay_prefetch(trace: RoutingTrace, guesses: torch.Tensor, cache_size: int, count: int,
                     probs: torch.Tensor | None = None, min_prob: float = 0.0):
    """LRU + prefetch replay: (hit mask bool [L, T, k] in trace order, per-layer hits, misses,
    and totals of prefetches, prefetch_hits, prefetch_wasted)."""
    mask = torch.zeros(trace.experts.shape, dtype=torch.bool)
    per_hits, per_misses, stats = [], [], {"prefetches": 0, "prefetch_hits": 0, "prefetch_wasted": 0}
    if probs is not None:       # as the engine sees them: rounded to 1/SCORE_SCALE on the device
        from ..engine.prefetch import SCORE_SCALE
        probs = (torch.as_tensor(probs).float() * SCORE_SCALE).round().long().tolist()
    for l, (requests, layer_guesses) in enumerate(zip(_layer_requests(trace), guesses[:, :, :count].tolist())):
        cache = _LayerCache(cache_size, "lru", requests)
        unused_prefetch: set[int] = set()
        h = m = 0
        for t, (needed, guess) in enumerate(zip(requests, layer_guesses)):
            round_ = [g for g in dict.fromkeys(guess) if g >= 0]
            for g in round_:
                if g not in cache.resident and probs is not None and _unlikely(cache, g, round_, probs[l][t], min_prob):
                    continue
                if g not in cache.resident:
                    evicted = cache.load(g, round_)
                    cache.clock += 1
                    cache.last_use[g] = cache.clock
                    stats["prefetches"] += 1
                    if evicted in unused_prefetch:
                        stats["prefetch_wasted"] += 1
                    unused_prefetch.discard(evicted)
                    unused_prefetch.add(g)
            resident = set(cache.resident)
            served = [e for e in needed if e in unused_prefetch]
            stats["prefetch_hits"] += len(served)
            unused_prefetch -= set(served)
            dh, dm = cache.step(t, needed)
            # Demand misses may evict unused prefetches too.
            stats["prefetch_wasted"] += len((resident - cache.resident) & unused_prefetch)
            unused_prefetch &= cache.resident
            mask[l, t] = torch.tensor([e in resident for e in trace.experts[l, t].tolist()])
            h, m = h + dh, m + dm
        per_hits.append(h)
        per_misses.append(m)
    return mask, per_hits, per_misses, stats


def _unlikely(cache: _LayerCache, g: int, round_: list[int], p: list[int], min_prob: float) -> bool:
    """The engine's rule (ExpertCache._pump): skip a guess below min_prob, or one no more likely
    than the expert it would evict (p: probabilities in 1/SCORE_SCALE)."""
    from ..engine.prefetch import SCORE_SCALE
    if p[g] < min_prob * SCORE_SCALE:
        return True
    if len(cache.resident) < cache.size:
        return False
    victim = cache.victim(cache.resident - set(round_))
    return p[g] <= p[victim]


def simulate_prefetch(trace: RoutingTrace, guesses, cache_size: int, prefetch: int, *, probs=None,
                      min_prob: float = 0.0) -> dict:
    """LRU caches with speculative loading of ``prefetch`` guessed experts per layer and token.

    guesses: LongTensor [layers, tokens, >= prefetch], the guessed experts of layer l at token t
    in rank order (e.g. ``moe_colab.analysis.prefetch_recall.guess_experts``); -1 means no guess (layer 0
    has no earlier layer to guess from). Before layer l's demand at token t, each guess that is
    not resident is loaded, evicting the least recently used expert that is not a guess of the
    same round; loaded guesses count as most recent (as ExpertCache.prefetch does). Returns
    simulate_cache's dict plus "prefetches" (speculative loads), "prefetch_hits" (uses served
    by a prefetch) and "prefetch_wasted" (prefetched experts evicted before any use).

    probs: float [layers, tokens, experts], the next router's probabilities behind the guesses
    (``guess_experts(..., with_probs=True)``): then, as the engine does, a guess below ``min_prob``
    or no more likely than the expert it would evict is not loaded.
    """
    _check(trace, cache_size, "lru")
    guesses = _check_guesses(trace, guesses, prefetch)
    count = min(prefetch, cache_size)          # more guesses than slots would evict each other
    _, per_hits, per_misses, stats = _replay_prefetch(trace, guesses, cache_size, count, probs, min_prob)
    return _summary(per_hits, per_misses, policy="lru+prefetch", cache_size=cache_size,
                    prefetch=count, **stats)


def hit_mask(trace: RoutingTrace, cache_size: int, policy: str = "lru", *, guesses=None,
             prefetch: int = 0) -> torch.Tensor:
    """bool [layers, tokens, top_k], aligned with ``trace.experts``: was that use a hit?

    The per-use events behind simulate_cache (``prefetch=0``) or simulate_prefetch (LRU with
    ``prefetch`` of ``guesses``); ``hit_mask(...).sum()`` equals their "hits"."""
    _check(trace, cache_size, policy)
    if prefetch:
        if policy != "lru":
            raise ValueError(f"prefetch is simulated in front of LRU only, not {policy!r}")
        if guesses is None:
            raise ValueError("prefetch > 0 needs guesses [layers, tokens, n]")
        guesses = _check_guesses(trace, guesses, prefetch)
        return _replay_prefetch(trace, guesses, cache_size, min(prefetch, cache_size))[0]
    mask = torch.zeros(trace.experts.shape, dtype=torch.bool)
    for l, requests in enumerate(_layer_requests(trace)):
        cache = _LayerCache(cache_size, policy, requests)
        for t, needed in enumerate(requests):
            resident = set(cache.resident)
            cache.step(t, needed)
            mask[l, t] = torch.tensor([e in resident for e in trace.experts[l, t].tolist()])
    return mask
