"""OffloadedMoE: the module that replaces a transformers MoE block.

It keeps the original router (so router outputs, hooks and ``output_router_logits`` behave
exactly as in transformers) and computes the experts from the ExpertCache instead of from
parameters. One forward of layer l reads top to bottom:

    x [T, H] -> route: top-k weights, indices [T, k]       (the model's router, or an injected
                                                            replay in the benchmark)
             -> one host sync: the experts needed (and the early guess for layer l+1)
             -> for expert, views in cache.experts(l, needed, prefetch=guess):
                    partial[expert] = weight * expert(x)    (hits first, then each miss as its
                                                             copy lands; the guessed experts of
                                                             l+1 queue behind l's own copies)
             -> y [T, H] = the partial outputs added in ascending expert order

so the result does not depend on which experts happened to be cached, prefetched or copied.
"""
from __future__ import annotations

from contextlib import closing
from typing import Callable

import torch
from torch import nn

from .batched import BatchedExperts
from .cache import ExpertCache
from .prefetch import Speculator

# (layer, router, x [T, H]) -> (weights [T, k], expert ids [T, k]): who picks the experts.
RouteFn = Callable[[int, nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def route_with_router(layer: int, router: nn.Module, x: torch.Tensor):
    """The model's own choice: its router returns (logits, top-k weights, top-k indices)."""
    _, weights, experts = router(x)
    return weights, experts


def _maybe(t: torch.Tensor | None) -> tuple:
    return () if t is None else (t,)


class OffloadedMoE(nn.Module):
    """``layer_idx`` is the MoE layer (the cache's layer), not the decoder layer. ``family``: the
    model's adapter (adapters/base.py), whose ``combine`` adds what the family adds to the routed
    sum (shared experts) and whose ``block_output`` shapes the return value; ``kept``: the other
    modules of the original block it needs (shared experts), kept under their own names."""

    def __init__(self, layer_idx: int, router: nn.Module, cache: ExpertCache, fmt, top_k: int,
                 num_experts: int, speculator: Speculator | None = None, route: RouteFn = route_with_router,
                 *, router_attr: str = "gate", kept: dict[str, nn.Module] | None = None, family=None,
                 batched: bool = False):
        super().__init__()
        self.layer_idx, self.top_k, self.num_experts = layer_idx, top_k, num_experts
        # The router (and shared experts) under the names transformers' block gives them: trunk
        # tensor names, hooks and output_router_logits still find them.
        self.router_attr = router_attr
        self.add_module(router_attr, router)
        for name, module in (kept or {}).items():
            self.add_module(name, module)
        self.family = family
        self.cache = cache                      # plain attributes: not submodules, not moved by .to()
        self.format = fmt                       # how an expert computes from its packed buffer
        self.speculator = speculator            # guesses layer l+1's experts (None: no prefetch)
        self.route = route
        # one token: the layer's experts as one computation when they fit the slots (engine/batched.py)
        self.batched = BatchedExperts(fmt) if batched else None

    def extra_repr(self) -> str:
        return (f"layer={self.layer_idx}, experts={self.num_experts}, top_k={self.top_k}, "
                f"on_device={self.cache.experts_on_device}, "
                f"prefetch={self.speculator.count if self.speculator else 0}")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape                                     # [B, S, H]
        x = hidden_states.reshape(-1, shape[-1])                        # [T, H]
        top_w, top_i = self.route(self.layer_idx, getattr(self, self.router_attr), x)   # [T, k], [T, k]
        spec = self.speculator
        early = spec.guess_before(x) if spec is not None and spec.early else None   # [p]
        if x.shape[0] == 1:
            out = self._one_token(x, top_w, top_i, early)
        else:
            out = self._tokens(x, top_w, top_i, early)
        if self.family is not None:
            out = self.family.combine(self, x, out)                     # + shared experts, if any
        if spec is not None and not spec.early:
            self.cache.prefetch(self.layer_idx + 1, *spec.split(self.cache.sync(spec.guess_after(out),
                                                                                layer=self.layer_idx)))
        out = out.reshape(shape)
        return out if self.family is None else self.family.block_output(out, top_w)

    def _guess(self, host: list[int]) -> tuple[list[int] | None, list[float] | None]:
        """The early guess's part of a sync: (guesses, probabilities), or (None, None)."""
        return self.speculator.split(host) if host else (None, None)

    def _one_token(self, x, top_w, top_i, early) -> torch.Tensor:
        """Decoding one sequence: every chosen expert reads all of x [1, H], so no sort and no
        gather, and the host learns the k experts themselves (and the guess) in one sync."""
        host = self.cache.sync(top_i, *_maybe(early), layer=self.layer_idx)
        chosen = host[:self.top_k]                                      # router order
        guess, prob = self._guess(host[self.top_k:])
        needed = sorted(set(chosen))
        if self.batched is not None and len(needed) <= self.cache.experts_on_device:
            return self._one_token_batched(x, top_w, chosen, needed, guess, prob)
        partial: dict[int, torch.Tensor] = {}
        with closing(self.cache.experts(self.layer_idx, sorted(set(chosen)), guess, prob)) as ready:
            for expert, views in ready:
                j = chosen.index(expert)
                partial[expert] = self.format.forward(views, x) * top_w[:, j:j + 1]      # [1, H]
        out = torch.zeros_like(x)
        for expert in sorted(partial):
            out += partial[expert].to(out.dtype)
        return out

    def _one_token_batched(self, x, top_w, chosen, needed, guess, prob) -> torch.Tensor:
        """The layer's experts fit its slots together: collect every expert's views (hits first,
        misses as they land), then one computation for all of them (engine/batched.py)."""
        views: dict[int, object] = {}
        with closing(self.cache.experts(self.layer_idx, needed, guess, prob, hold=True)) as ready:
            for expert, v in ready:
                views[expert] = v
        try:
            ys = self.batched([views[e] for e in needed], x)           # [n, 1, H]
        finally:                         # no copy may overwrite these slots under the batched kernels
            self.cache.release(self.layer_idx, needed)
        out = torch.zeros_like(x)
        for j, expert in enumerate(needed):                             # ascending expert order
            i = chosen.index(expert)
            out += (ys[j] * top_w[:, i:i + 1]).to(out.dtype)
        return out

    def _tokens(self, x, top_w, top_i, early) -> torch.Tensor:
        """Several tokens (a prompt, or a batch): group the (token, expert) pairs by expert."""
        flat = top_i.reshape(-1)                                        # [T*k]
        # scatter_add, not bincount: bincount on CUDA syncs to size its output.
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat))                             # [E]
        host = self.cache.sync(counts, *_maybe(early), layer=self.layer_idx)
        counts_host = host[:self.num_experts]
        guess, prob = self._guess(host[self.num_experts:])
        needed = [e for e, c in enumerate(counts_host) if c]
        order = torch.argsort(flat, stable=True)                        # [T*k] grouped by expert
        offsets = [0]
        for c in counts_host:
            offsets.append(offsets[-1] + c)
        weights_flat = top_w.reshape(-1)
        partial: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        with closing(self.cache.experts(self.layer_idx, needed, guess, prob)) as ready:
            for expert, views in ready:
                sel = order[offsets[expert]:offsets[expert + 1]]        # positions in [T*k]
                tokens = sel // self.top_k                              # [n]
                y = self.format.forward(views, x[tokens])               # [n, H]
                partial[expert] = (tokens, y * weights_flat[sel, None])
        out = torch.zeros_like(x)
        for expert in sorted(partial):
            tokens, y = partial[expert]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out
