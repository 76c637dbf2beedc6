"""How well can layer l guess the experts of layer l+a? (the paper's Figure 2, right)

Speculative loading applies a LATER layer's router to the current hidden state. For every layer
l, token t and distance a ("layers ahead"):

    guess  = top-p experts of  router[l+a]( norm[l+a]( h_l ) )      norm = post_attention_layernorm
    recall = |guess & experts layer l+a really used| / top_k         averaged over tokens and l

Two hidden states h_l can feed the guess (prefetch.py uses the same two):

    "before"  residual stream after layer l's attention, before its experts
              (the input of layer l's post_attention_layernorm): known earliest
    "after"   layer l's output (after its experts): what layer l+1 starts from

With a = 0 and "before" the guess IS the router's own choice (recall 1 at p = top_k): a check.
Chance recall for p random guesses is p / num_experts.

Reference: Eliseev & Mazur, arXiv 2312.17238, section 3.2 and Figure 2 (right).
"""
from __future__ import annotations

import torch

from .routing import _adapter, _as_batch_one, router_hooks, stack_calls

SOURCES = ("before", "after")


def _chunks(input_ids) -> list[torch.Tensor]:
    if isinstance(input_ids, (list, tuple)) and input_ids and not isinstance(input_ids[0], int):
        return [_as_batch_one(c) for c in input_ids]
    return [_as_batch_one(input_ids)]


@torch.no_grad()
def layer_states(model, input_ids) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """One forward of one sequence: (experts [L, T, k], {"before": [L x [T, H]], "after": [...]}),
    L the MoE layers (dense layers have no router to guess for)."""
    ad = _adapter(model)
    layers = ad.moe_decoder_layers(model)
    ids = _as_batch_one(input_ids).to(model.device)
    before: list = [None] * len(layers)
    after: list = [None] * len(layers)

    # Keep the LAST call of each hook: an engine that guesses with the next layer's norm calls
    # that norm early on the previous layer's state; the layer's own call comes after it.
    def catch_before(l):
        def hook(module, args):
            before[l] = args[0].detach()
        return hook

    def catch_after(l):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            after[l] = out.detach()
        return hook

    handles = []
    try:
        for l, layer in enumerate(layers):
            handles.append(ad.pre_moe_norm(layer).register_forward_pre_hook(catch_before(l)))
            handles.append(layer.register_forward_hook(catch_after(l)))
        with router_hooks(model) as calls:
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    experts, _ = stack_calls(calls, ids.shape[1])
    H = model.config.hidden_size
    flat = lambda xs: [x.reshape(-1, H) for x in xs]  # noqa: E731   [T, H] each
    return experts, {"before": flat(before), "after": flat(after)}


@torch.no_grad()
def guess_probs(model, hidden: torch.Tensor, target_layer: int) -> torch.Tensor:
    """float [T, E]: router[target]( norm[target](hidden) ) probabilities, hidden [T, H]."""
    ad = _adapter(model)
    layer = ad.moe_decoder_layers(model)[target_layer]
    return ad.router_probs(ad.router(ad.moe_block(layer)), ad.pre_moe_norm(layer)(hidden))


def _check_args(model, ahead, source, max_prefetch):
    ad = _adapter(model)
    L, E = ad.num_layers(model.config), ad.num_experts(model.config)
    ahead = [ahead] if isinstance(ahead, int) else list(ahead)
    bad = [a for a in ahead if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < L]
    if bad or not ahead:
        raise ValueError(f"ahead must be ints in 0..{L - 1} (this model has {L} layers), got {ahead}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")
    P = E if max_prefetch is None else max_prefetch
    if isinstance(P, bool) or not isinstance(P, int) or not 1 <= P <= E:
        raise ValueError(f"max_prefetch must be an int in 1..{E}, got {max_prefetch!r}")
    return ahead, L, E, P


def prefetch_recall(model, input_ids, ahead=(1, 2), max_prefetch: int | None = None,
                    source: str = "before") -> dict:
    """Recall of speculative guesses, from real hidden states.

    input_ids: [1, T], [T], or a list of those (chunks of a long text; one forward each).
    Returns {"recall": float [len(ahead), P] (column p-1: p experts pre-loaded),
             "per_layer": float [len(ahead), L, P] (row l: guesses made at layer l; NaN where
             l + a is past the last layer), "chance": [P] = p / E, "ahead", "prefetch": 1..P,
             "source", "tokens"}.
    """
    ahead, L, E, P = _check_args(model, ahead, source, max_prefetch)
    found = torch.zeros(len(ahead), L, P, dtype=torch.float64)   # sum over tokens of recall
    tokens = 0
    for ids in _chunks(input_ids):
        experts, states = layer_states(model, ids)               # [L, T, k]
        k, T = experts.shape[2], experts.shape[1]
        tokens += T
        for ai, a in enumerate(ahead):
            for l in range(L - a):
                probs = guess_probs(model, states[source][l], l + a).cpu()      # [T, E]
                order = probs.argsort(dim=-1, descending=True)[:, :P]            # [T, P]
                hit = (order[:, :, None] == experts[l + a][:, None, :]).any(-1)  # [T, P]
                found[ai, l] += (hit.cumsum(-1).double() / k).sum(0)
    per_layer = found / max(tokens, 1)
    for ai, a in enumerate(ahead):
        per_layer[ai, L - a:] = float("nan")
    recall = torch.stack([per_layer[ai, :L - a].mean(0) for ai, a in enumerate(ahead)])
    return {"recall": recall.float(), "per_layer": per_layer.float(),
            "chance": [p / E for p in range(1, P + 1)], "ahead": ahead,
            "prefetch": list(range(1, P + 1)), "source": source, "tokens": tokens}


def guess_experts(model, input_ids, count: int, source: str = "before", ahead: int = 1,
                  with_probs: bool = False):
    """LongTensor [L, T, count]: the experts guessed for layer l at each token, best first, made
    at layer l - ahead; -1 for the first ``ahead`` layers (nothing earlier to guess from).
    Tokens of a list of chunks are concatenated, matching RoutingTrace.cat. Feed to
    ``moe_colab.analysis.simulate.simulate_prefetch``. ``with_probs``: also the probabilities
    behind the guesses, float [L, T, E] (0 where there is no guess)."""
    (ahead,), L, E, count = _check_args(model, ahead, source, count)
    out, out_p = [], []
    for ids in _chunks(input_ids):
        _, states = layer_states(model, ids)
        T = states[source][0].shape[0]
        g = torch.full((L, T, count), -1, dtype=torch.long)
        pr = torch.zeros(L, T, E)
        for l in range(ahead, L):
            probs = guess_probs(model, states[source][l - ahead], l).cpu()        # [T, E]
            g[l] = probs.topk(count, dim=-1).indices
            pr[l] = probs
        out.append(g)
        out_p.append(pr)
    guesses = torch.cat(out, dim=1)
    return (guesses, torch.cat(out_p, dim=1)) if with_probs else guesses
