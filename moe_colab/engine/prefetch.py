"""Speculative expert loading: guess layer l+1's experts while layer l is still running.

The residual stream changes little from one layer to the next, so layer l+1's router applied
to layer l's hidden state is a good guess of the experts layer l+1 will pick (the paper's
section 3.2 and Figure 2). Two hidden states can feed the guess:

    "before"  the residual stream after layer l's attention, before its experts:
              available earliest, so its copies overlap layer l's expert compute too
    "after"   the residual stream after layer l's experts: closer to what layer l+1 sees,
              but its copies only overlap layer l+1's attention

Either way the state goes through layer l+1's own pre-MoE norm before its router, as it will
for real. ``docs/locality.md`` measures which guesses better on the shipped model: "after" one
layer ahead with 2 guesses recalls 0.796 of the experts used against 0.672 for "before", but
nearly all of the gap is the layer 0 -> 1 guess (0.784 vs 0.439); from layer 1 on they are close
(0.749/0.747, 0.854/0.830). So the default ("auto" in load_model) guesses "after" at layer 0 and
"before" everywhere else, where its copies start earlier.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# (next layer, hidden state [T, H]) -> (expert ids [count], probabilities [E] or None): who makes
# the guess. The engine's own guess applies the next layer's norm and router
# (Speculator.router_guess); the benchmark injects a replay of a recorded trace instead.
GuessFn = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
SCORE_SCALE = 10_000       # probabilities travel to the host as ints in 1/10,000


def _softmax_probs(router: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Mixtral's router: softmax over the logits (float32) [T, E]."""
    return torch.softmax(nn.functional.linear(h, router.weight).float(), dim=-1)


def guess_source(guess_from: str, layer: int) -> str:
    """The hidden state that layer ``layer``'s guess reads: "auto" is "after" at layer 0 (its
    experts change the residual stream most; recall 0.784 vs 0.439 on tiny) and "before"
    elsewhere (about the same recall, and its copies start earlier)."""
    if guess_from == "auto":
        return "after" if layer == 0 else "before"
    if guess_from not in ("before", "after"):
        raise ValueError(f"guess_from must be 'auto', 'before' or 'after', got {guess_from!r}")
    return guess_from


class Speculator:
    """Guesses ``count`` experts of layer ``layer + 1`` from layer ``layer``'s hidden state."""

    def __init__(self, layer: int, count: int, source: str, own_norm: nn.Module, next_norm: nn.Module,
                 next_router: nn.Module, num_experts: int, guess_fn: GuessFn | None = None, probs=None):
        self.layer, self.count, self.source, self.num_experts = layer, count, source, num_experts
        # (router, hidden [T, H]) -> scores [T, E] float32 ranking experts as the router does: the
        # adapter's router_probs (a softmax for most families; sigmoid + bias for DeepSeek-V3)
        self.probs = probs if probs is not None else _softmax_probs
        self.early = source == "before"          # the guess is ready before this layer's experts run
        self.next_norm, self.next_router = next_norm, next_router
        self.guess_fn: GuessFn = guess_fn if guess_fn is not None else self.router_guess
        self.residual: torch.Tensor | None = None
        # The residual stream is not an input of the MoE block: catch it on its way into the
        # norm that precedes the block.
        self._hook = own_norm.register_forward_pre_hook(self._catch_residual)

    def _catch_residual(self, module, args) -> None:
        self.residual = args[0]

    def remove(self) -> None:
        self._hook.remove()

    def router_guess(self, next_layer: int, hidden: torch.Tensor):
        h = self.next_norm(hidden).reshape(-1, hidden.shape[-1])             # [T, H]
        prob = self.probs(self.next_router, h).mean(dim=0)                   # [E] averaged over tokens
        return torch.topk(prob, self.count).indices, prob                    # [count], [E]

    def guess_before(self, x: torch.Tensor) -> torch.Tensor:
        """From the residual stream before this layer's experts (x, the block's input, if the
        residual was not caught). Returns ints [count + E]: the guesses, then every expert's
        probability in 1/SCORE_SCALE (what the host reads in the layer's one sync)."""
        residual = self.residual if self.residual is not None else x
        self.residual = None
        return self._pack(*self.guess_fn(self.layer + 1, residual))

    def guess_after(self, moe_out: torch.Tensor) -> torch.Tensor:
        """From the residual stream after this layer's experts: residual + the block's output."""
        residual = self.residual.reshape(moe_out.shape) if self.residual is not None else 0
        self.residual = None
        return self._pack(*self.guess_fn(self.layer + 1, residual + moe_out))

    def _pack(self, guesses: torch.Tensor, prob: torch.Tensor | None) -> torch.Tensor:
        if prob is None:        # no probabilities (a replayed guess): the guesses are certain
            prob = torch.zeros(self.num_experts, device=guesses.device).index_fill_(0, guesses, 1.0)
        return torch.cat([guesses.long(), (prob * SCORE_SCALE).round().long()])

    def split(self, host: list[int]) -> tuple[list[int], list[float]]:
        """The host's view of what _pack sent: (guesses, probabilities)."""
        return host[:self.count], [v / SCORE_SCALE for v in host[self.count:]]
