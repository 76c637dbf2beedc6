"""OffloadedMoE: the module that replaces a transformers MoE block.

It keeps the original router (so router outputs, hooks and ``output_router_logits`` behave
exactly as in transformers) and computes the experts from the ExpertCache instead of from
parameters. One forward of layer l:

    x [T, H] -> router -> top-k weights, indices [T, k]
             -> one host sync: the token's k experts (decoding one sequence) or per-expert
                token counts [E] (a prompt, a batch), and the guess for layer l+1 [p]
             -> cache.run_layer(l, needed): hits compute at once, misses are copied in
             -> cache.prefetch(l+1, guess)   (issued right after l's own misses, so it
                                              overlaps l's expert compute and l+1's attention)
             -> y [T, H] = sum over chosen experts of weight * expert(x)

Outputs are accumulated in ascending expert order, as transformers' eager experts do, so the
result does not depend on which experts happened to be cached.
"""
from __future__ import annotations

import torch
from torch import nn

from .cache import ExpertCache
from .prefetch import Speculator


class OffloadedMoE(nn.Module):
    def __init__(self, layer_idx: int, router: nn.Module, cache: ExpertCache, top_k: int,
                 num_experts: int, speculator: Speculator | None = None):
        super().__init__()
        self.layer_idx, self.top_k, self.num_experts = layer_idx, top_k, num_experts
        self.gate = router                      # same name as transformers' block: hooks still find it
        self.cache = cache                      # plain attribute: not a submodule, not moved by .to()
        self.speculator = speculator            # guesses layer l+1's experts (None: no prefetch)
        # Optional replacement of the router's choice, (layer, x [T, H]) -> (weights, indices)
        # [T, k] each: the benchmark replays recorded routing traces through it.
        self.route_fn = None

    def extra_repr(self) -> str:
        return (f"layer={self.layer_idx}, experts={self.num_experts}, top_k={self.top_k}, "
                f"on_device={self.cache.experts_on_device}, "
                f"prefetch={self.speculator.count if self.speculator else 0}")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape                                     # [B, S, H]
        x = hidden_states.reshape(-1, shape[-1])                        # [T, H]
        if self.route_fn is None:
            _, top_w, top_i = self.gate(x)                              # [T, k], [T, k]
        else:
            top_w, top_i = self.route_fn(self.layer_idx, x)
        spec = self.speculator
        guess = spec.guess_before(x) if spec is not None and spec.source == "before" else None
        if x.shape[0] == 1:
            out = self._one_token(x, top_w, top_i, guess)
        else:
            out = self._tokens(x, top_w, top_i, guess)
        if spec is not None and spec.source == "after":
            spec.prefetch(self.cache.to_host(spec.guess_after(out)))
        return out.reshape(shape)

    def _run(self, needed: list[int], compute, guess, host: list[int], skip: int) -> None:
        if guess is not None:
            # Queue behind this layer's own misses (issued first inside run_layer via the hook).
            self.cache.run_layer(self.layer_idx, needed, compute,
                                 after_issue=lambda: self.speculator.prefetch(host[skip:]))
        else:
            self.cache.run_layer(self.layer_idx, needed, compute)

    def _one_token(self, x, top_w, top_i, guess) -> torch.Tensor:
        """Decoding one sequence: every chosen expert reads all of x [1, H], so no sort and no
        gather, and the host learns the k experts themselves (and the guess) in one sync."""
        host = self.cache.to_host(top_i) if guess is None else self.cache.to_host(top_i, guess)
        chosen = host[:self.top_k]                                      # router order
        w = top_w.reshape(-1, 1)                                        # [k, 1]
        outputs: dict[int, torch.Tensor] = {}

        def compute(expert: int, views: dict) -> None:
            j = chosen.index(expert)
            outputs[expert] = self.cache.store.format.forward(views, x) * w[j:j + 1]   # [1, H]

        self._run(sorted(set(chosen)), compute, guess, host, self.top_k)
        out = torch.zeros_like(x)
        for expert in sorted(outputs):
            out += outputs[expert].to(out.dtype)
        return out

    def _tokens(self, x, top_w, top_i, guess) -> torch.Tensor:
        """Several tokens (a prompt, or a batch): group the (token, expert) pairs by expert."""
        flat = top_i.reshape(-1)                                        # [T*k]
        # scatter_add, not bincount: bincount on CUDA syncs to size its output.
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat))                             # [E]
        # The one host synchronisation of the layer: which experts, and the early guess.
        host = self.cache.to_host(counts) if guess is None else self.cache.to_host(counts, guess)
        counts_host = host[:self.num_experts]
        needed = [e for e, c in enumerate(counts_host) if c]
        order = torch.argsort(flat, stable=True)                        # [T*k] grouped by expert
        offsets = [0]
        for c in counts_host:
            offsets.append(offsets[-1] + c)
        weights_flat = top_w.reshape(-1)
        outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def compute(expert: int, views: dict) -> None:
            sel = order[offsets[expert]:offsets[expert + 1]]            # positions in [T*k]
            tokens = sel // self.top_k                                  # [n]
            y = self.cache.store.format.forward(views, x[tokens])       # [n, H]
            outputs[expert] = (tokens, y * weights_flat[sel, None])

        self._run(needed, compute, guess, host, self.num_experts)
        out = torch.zeros_like(x)
        for expert in sorted(outputs):
            tokens, y = outputs[expert]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out
