"""Routing for the benchmark: which experts each layer uses for each token, the same in every row.

A benchmark row's speed depends on routing (how often an expert is reused, how well the next
layer is guessed), so every row of one run replays the SAME routing. Sources (``--routing``):

    model            the synthetic model's own routers (random weights, so random-ish routing);
                     guesses come from the engine's speculator (next router on this hidden state)
    mixtral-table5   synthetic routing whose consecutive-token overlap follows Mixtral's own
                     measurement: Table 5 of arXiv 2401.04088 ("first or second choice"
                     repetitions, mean over 8 Pile subsets): 48.0% at layer 0, 63.7% at layer 15,
                     50.9% at layer 31, linear in between (random top-2 of 8 gives 46.4%)
    synthetic:P      synthetic routing, overlap P at every layer
    tiny             a trace recorded from the built-in ``tiny`` model reading a stdlib source
                     file, its layers tiled onto ours (layer l replays tiny layer l % L_tiny)
    trace:PATH       a saved moe_colab.RoutingTrace (layers tiled the same way)

"Overlap" is Mixtral's statistic: the share of consecutive token pairs whose top-k sets share at
least one expert. The synthetic generator reaches a target o exactly in expectation: each token
keeps one of the previous token's experts with probability r = (o - c) / (1 - c) (c = chance
overlap) and otherwise draws its top-k uniformly; below chance it avoids the previous set instead.

Replayed traces bring their own guesses: for a decoded token, the guess for layer l+1 holds each
expert layer l+1 really uses with probability ``recall`` (default 0.8: the paper reports high
recall one layer ahead; docs/locality.md measured 0.72 on a random model) and random wrong
experts in the other places. The recall actually reached is reported.
"""
from __future__ import annotations

import random
from math import comb

import torch

# Table 5 of arXiv 2401.04088, "first or second choice", mean of the eight Pile subsets.
MIXTRAL_TABLE5 = {0: 0.4804, 15: 0.6369, 31: 0.5091}
DEFAULT_RECALL = 0.8


def chance_overlap(num_experts: int, top_k: int) -> float:
    """P(two independent uniform top-k sets share an expert) = 1 - C(E-k, k) / C(E, k)."""
    return 1.0 - comb(num_experts - top_k, top_k) / comb(num_experts, top_k)


def table5_overlap(layer: int, num_layers: int) -> float:
    """Mixtral's measured overlap at ``layer`` of ``num_layers`` (its 32 layers rescaled)."""
    x = 31.0 * layer / max(1, num_layers - 1)
    (x0, y0), (x1, y1) = ((0, MIXTRAL_TABLE5[0]), (15, MIXTRAL_TABLE5[15])) if x <= 15 else \
        ((15, MIXTRAL_TABLE5[15]), (31, MIXTRAL_TABLE5[31]))
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def synthetic_experts(overlaps: list[float], tokens: int, num_experts: int, top_k: int,
                      seed: int = 0) -> torch.Tensor:
    """LongTensor [layers, tokens, top_k]: consecutive tokens overlap with probability overlaps[l]."""
    for o in overlaps:
        if not 0.0 <= o <= 1.0:
            raise ValueError(f"overlap probability {o} is outside [0, 1]")
    rng = random.Random(seed)
    c = chance_overlap(num_experts, top_k)
    everyone = list(range(num_experts))
    out = torch.empty(len(overlaps), tokens, top_k, dtype=torch.long)
    for l, o in enumerate(overlaps):
        keep = (o - c) / (1 - c) if o >= c else 0.0          # force one shared expert
        avoid = (c - o) / c if o < c else 0.0                 # force disjoint sets
        prev = rng.sample(everyone, top_k)
        out[l, 0] = torch.tensor(prev)
        for t in range(1, tokens):
            u = rng.random()
            if u < keep:
                kept = rng.choice(prev)
                cur = [kept] + rng.sample([e for e in everyone if e != kept], top_k - 1)
                rng.shuffle(cur)
            elif u < keep + avoid and num_experts - top_k >= top_k:
                cur = rng.sample([e for e in everyone if e not in prev], top_k)
            else:
                cur = rng.sample(everyone, top_k)
            out[l, t] = torch.tensor(cur)
            prev = cur
    return out


def consecutive_overlap(experts: torch.Tensor) -> torch.Tensor:
    """Per layer, the share of consecutive token pairs sharing an expert: float [layers]."""
    a, b = experts[:, :-1, :, None], experts[:, 1:, None, :]       # [L, T-1, k, 1], [L, T-1, 1, k]
    return (a == b).any(-1).any(-1).float().mean(-1)


def guess_experts(truth: list[int], count: int, num_experts: int, recall: float, rng: random.Random) -> list[int]:
    """``count`` guesses holding each true expert with probability ``recall``, the rest wrong."""
    hit = [e for e in truth if rng.random() < recall][:count]
    wrong = [e for e in range(num_experts) if e not in truth]
    rng.shuffle(wrong)
    guess = hit + wrong[:count - len(hit)]
    guess += [e for e in truth if e not in guess][:count - len(guess)]   # more guesses than wrong experts
    return guess


class ReplayRouting:
    """Replays experts [L, N, k] as the engine's routing and guessing strategies (and NaiveMoE's).

    Each call of layer l consumes the next T tokens of layer l's row, so one run routes tokens
    0..P+D-1 of the trace (P prompt tokens at once, then D decoded tokens); ``reset()`` rewinds.
    """

    def __init__(self, experts: torch.Tensor, num_experts: int, *, weights: torch.Tensor | None = None,
                 recall: float = DEFAULT_RECALL, count: int = 2, device="cpu", seed: int = 0,
                 description: str = ""):
        if not 0.0 <= recall <= 1.0:
            raise ValueError(f"guess recall {recall} is outside [0, 1]")
        L, N, k = experts.shape
        if int(experts.max()) >= num_experts:
            raise ValueError(f"the trace uses expert {int(experts.max())} but the model has {num_experts}")
        if weights is None:   # a sharper first choice, as Mixtral's normalised top-2 weights are
            w = torch.linspace(0.6, 0.4, k) if k > 1 else torch.ones(1)
            weights = (w / w.sum()).expand(L, N, k)
        self.experts, self.num_experts, self.recall, self.count = experts, num_experts, recall, count
        self.description = description
        self.device = torch.device(device)
        self._experts = experts.to(self.device)
        self._weights = weights.float().to(self.device)
        rng = random.Random(seed + 1)
        guesses = torch.zeros(L, N, max(count, 1), dtype=torch.long)
        for l in range(1, L):
            for t in range(N):
                guesses[l, t] = torch.tensor(guess_experts(experts[l, t].tolist(), count, num_experts, recall, rng))
        self.guesses = guesses
        self._guesses = guesses.to(self.device)
        self.seed = seed
        self.reset()

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[1]

    def reset(self) -> None:
        """Rewind: the same tokens, and the same guesses for prompt chunks, as the first run."""
        self._chunk_rng = random.Random(self.seed + 2)
        self.pos = [0] * self.experts.shape[0]
        self.span = [(0, 0)] * self.experts.shape[0]

    def route(self, layer: int, router, x: torch.Tensor):
        """A RouteFn (engine/moe_block.py): the trace's next T tokens of this layer; the router is
        not called."""
        T, start = x.shape[0], self.pos[layer]
        if start + T > self.num_tokens:
            raise RuntimeError(f"the routing trace has {self.num_tokens} tokens; layer {layer} asked for "
                               f"tokens {start}..{start + T - 1} (reset() between runs?)")
        self.pos[layer] += T
        self.span[layer] = (start, T)
        return self._weights[layer, start:start + T].to(x.dtype), self._experts[layer, start:start + T]

    def guess(self, next_layer: int, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The recorded guess for the token just routed (LongTensor [count])."""
        start, T = self.span[next_layer - 1]
        if T == 1:
            return self._guesses[next_layer, start]
        # A prompt chunk: the next layer's most used experts in it, with the same recall.
        used = torch.bincount(self.experts[next_layer, start:start + T].reshape(-1), minlength=self.num_experts)
        truth = [e for e in used.argsort(descending=True, stable=True).tolist() if used[e] > 0]
        g = guess_experts(truth, self.count, self.num_experts, self.recall, self._chunk_rng)
        return torch.tensor(g, dtype=torch.long, device=self.device)

    def strategies(self):
        """What build_engine (and build_naive) take to route and guess through this trace."""
        from ..engine.build import Strategies
        return Strategies(route=self.route, guess=lambda layer, hidden: (self.guess(layer), None))

    def summary(self, prefix: int) -> dict:
        """Measured statistics of the replayed trace: overlap per layer, and guess recall on the
        decoded part (tokens ``prefix`` and later)."""
        ov = consecutive_overlap(self.experts)
        truth = self.experts[1:, prefix:]                                # [L-1, D, k]
        g = self.guesses[1:, prefix:]                                    # [L-1, D, count]
        found = (truth[..., :, None] == g[..., None, :]).any(-1).float()
        return {"overlap_per_layer": [round(v, 4) for v in ov.tolist()],
                "overlap_mean": round(ov.mean().item(), 4),
                "chance_overlap": round(chance_overlap(self.num_experts, self.experts.shape[2]), 4),
                "guess_recall_target": self.recall,
                "guess_recall_measured": round(found.mean().item(), 4) if found.numel() else None}


def moe_blocks(model) -> list:
    from ..adapters.mixtral import MixtralAdapter
    return [MixtralAdapter.moe_block(layer) for layer in MixtralAdapter.decoder_layers(model)]


def tile_layers(experts: torch.Tensor, num_layers: int) -> torch.Tensor:
    """[L_src, N, k] -> [num_layers, N, k], layer l <- source layer l % L_src."""
    idx = torch.arange(num_layers) % experts.shape[0]
    return experts[idx]


def tiny_trace(tokens: int):
    """Routing of the built-in ``tiny`` model over a stdlib source file (teacher-forced)."""
    import argparse as _argparse
    import inspect

    from transformers import AutoTokenizer, MixtralForCausalLM

    from ..checkpoint import builtin_model_path
    from ..analysis.routing import record_routing

    path = builtin_model_path("tiny")
    if path is None:
        raise FileNotFoundError("--routing tiny needs the built-in tiny model (moe_colab/tiny/weights), "
                                "which this install lacks; use --routing mixtral-table5 or synthetic:P")
    tok = AutoTokenizer.from_pretrained(path)
    model = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = open(inspect.getsourcefile(_argparse), encoding="utf-8").read()
    ids = tok(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise ValueError(f"the tiny trace text has {ids.shape[1]} tokens, the benchmark needs {tokens}")
    return record_routing(model, ids)


def make_routing(spec: str, *, num_layers: int, num_experts: int, top_k: int, tokens: int,
                 recall: float, count: int, device, seed: int = 0) -> ReplayRouting | None:
    """The routing named by ``spec`` (see the module docstring); None for "model"."""
    spec = spec.strip()
    if spec == "model":
        return None
    if spec == "mixtral-table5":
        overlaps = [table5_overlap(l, num_layers) for l in range(num_layers)]
        desc = ("synthetic, consecutive-token overlap per layer from Mixtral's Table 5 "
                "(arXiv 2401.04088: 48.0% layer 0, 63.7% layer 15, 50.9% layer 31, interpolated)")
        experts = synthetic_experts(overlaps, tokens, num_experts, top_k, seed)
        weights = None
    elif spec.startswith("synthetic:"):
        try:
            p = float(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"--routing {spec!r}: expected synthetic:P with P a probability, e.g. synthetic:0.6")
        desc = f"synthetic, consecutive-token overlap {p:.2f} at every layer"
        experts = synthetic_experts([p] * num_layers, tokens, num_experts, top_k, seed)
        weights = None
    elif spec == "tiny" or spec.startswith("trace:"):
        if spec == "tiny":
            trace = tiny_trace(tokens)
            desc = "recorded from the built-in tiny model reading argparse.py (teacher-forced)"
        else:
            from ..analysis.routing import RoutingTrace
            trace = RoutingTrace.load(spec.split(":", 1)[1])
            desc = f"replayed from {spec.split(':', 1)[1]}"
        if (trace.num_experts, trace.top_k) != (num_experts, top_k):
            raise ValueError(f"the trace has {trace.num_experts} experts, top-{trace.top_k}; the benchmark "
                             f"model has {num_experts}, top-{top_k}")
        if trace.num_tokens < tokens:
            raise ValueError(f"the trace has {trace.num_tokens} tokens; the benchmark needs {tokens} "
                             f"(longest prompt + decoded tokens)")
        experts = tile_layers(trace.experts[:, :tokens], num_layers)
        weights = None if trace.weights is None else tile_layers(trace.weights[:, :tokens], num_layers)
        desc += f", {trace.num_layers} layers tiled onto {num_layers}"
    else:
        raise ValueError(f"unknown --routing {spec!r}; choose model, mixtral-table5, synthetic:P, tiny "
                         f"or trace:PATH")
    return ReplayRouting(experts, num_experts, weights=weights, recall=recall, count=count,
                         device=device, seed=seed, description=desc)
