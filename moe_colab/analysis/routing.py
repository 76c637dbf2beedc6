"""Routing traces: which experts every layer's router chose for every token, and how to record them.

A trace is two tensors (and a little metadata):

    experts   LongTensor [layers, tokens, top_k]   expert ids, in the router's rank order
    weights   float      [layers, tokens, top_k]   the router's normalised top-k weights (optional)

``record_routing`` fills one from a real model by putting a forward hook on each layer's router
(``layer.mlp.gate`` in transformers >= 5, found through the model's adapter). The offloaded model
keeps that very module inside its replacement MoE block, so the same hooks work on both.
Traces are what ``moe_colab.analysis.locality`` measures and ``moe_colab.analysis.simulate`` replays.

Reference: Eliseev & Mazur, arXiv 2312.17238, section 3.1 (experts are reused by nearby tokens).
"""
from __future__ import annotations

import inspect
import json
from contextlib import contextmanager
from pathlib import Path

import torch

_FORMAT = "moe_colab.RoutingTrace/1"


class RoutingTrace:
    """Expert choices [layers, tokens, top_k] (+ router weights) of one token sequence."""

    def __init__(self, experts, weights=None, *, num_experts: int | None = None,
                 token_ids=None, tokens: list[str] | None = None):
        experts = torch.as_tensor(experts)
        if experts.dim() != 3:
            raise ValueError(f"experts must be 3-D [layers, tokens, top_k], got shape {tuple(experts.shape)}")
        if experts.dtype.is_floating_point or experts.dtype == torch.bool or experts.is_complex():
            raise TypeError(f"experts must hold integer expert ids, got dtype {experts.dtype}")
        experts = experts.long().cpu()
        L, T, k = experts.shape
        if L == 0 or k == 0:
            raise ValueError(f"experts needs at least one layer and top_k >= 1, got shape {(L, T, k)}")
        if T and experts.min() < 0:
            raise ValueError(f"expert ids must be >= 0, found {int(experts.min())}")
        seen = int(experts.max()) + 1 if T else k
        if num_experts is None:
            num_experts = seen          # a guess: experts never chosen in this trace are invisible
        if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < k:
            raise ValueError(f"num_experts must be an int >= top_k={k}, got {num_experts!r}")
        if seen > num_experts:
            raise ValueError(f"expert id {seen - 1} is out of range for num_experts={num_experts}")
        if T and k > 1:
            s = experts.sort(dim=-1).values
            if (s[..., 1:] == s[..., :-1]).any():
                bad = (s[..., 1:] == s[..., :-1]).any(-1).nonzero()[0].tolist()
                raise ValueError(f"a token chose the same expert twice (layer {bad[0]}, token {bad[1]}): "
                                 f"top-k experts must be distinct")
        if weights is not None:
            weights = torch.as_tensor(weights)
            if tuple(weights.shape) != (L, T, k):
                raise ValueError(f"weights shape {tuple(weights.shape)} must equal experts shape {(L, T, k)}")
            if not weights.dtype.is_floating_point:
                raise TypeError(f"weights must be floating point, got dtype {weights.dtype}")
            weights = weights.float().cpu()
        if token_ids is not None:
            token_ids = torch.as_tensor(token_ids).long().reshape(-1).cpu()
            if token_ids.numel() != T:
                raise ValueError(f"token_ids has {token_ids.numel()} entries for a trace of {T} tokens")
        if tokens is not None:
            tokens = [str(t) for t in tokens]
            if len(tokens) != T:
                raise ValueError(f"tokens has {len(tokens)} strings for a trace of {T} tokens")
        self.experts, self.weights, self.token_ids, self.tokens = experts, weights, token_ids, tokens
        self._num_experts = num_experts

    # -- shape --------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.experts.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    @property
    def num_experts(self) -> int:
        return self._num_experts

    def __repr__(self) -> str:
        return (f"RoutingTrace(layers={self.num_layers}, tokens={self.num_tokens}, top_k={self.top_k}, "
                f"num_experts={self.num_experts}, weights={'yes' if self.weights is not None else 'no'})")

    @classmethod
    def cat(cls, traces: list["RoutingTrace"]) -> "RoutingTrace":
        """Traces of consecutive chunks of one text, joined along the token axis."""
        if not traces:
            raise ValueError("cat needs at least one trace")
        first = traces[0]
        for t in traces[1:]:
            if (t.num_layers, t.top_k, t.num_experts) != (first.num_layers, first.top_k, first.num_experts):
                raise ValueError(f"cannot join {t!r} to {first!r}: layers, top_k and num_experts must match")

        def join(attr):
            parts = [getattr(t, attr) for t in traces]
            return None if any(p is None for p in parts) else parts
        w, ids, toks = join("weights"), join("token_ids"), join("tokens")
        return cls(torch.cat([t.experts for t in traces], dim=1),
                   None if w is None else torch.cat(w, dim=1), num_experts=first.num_experts,
                   token_ids=None if ids is None else torch.cat(ids),
                   tokens=None if toks is None else [s for part in toks for s in part])

    # -- files --------------------------------------------------------------------------------
    def save(self, path) -> None:
        """One safetensors file: the tensors plus JSON metadata (num_experts, token strings)."""
        from safetensors.torch import save_file
        tensors = {"experts": self.experts.contiguous()}
        if self.weights is not None:
            tensors["weights"] = self.weights.contiguous()
        if self.token_ids is not None:
            tensors["token_ids"] = self.token_ids.contiguous()
        meta = {"format": _FORMAT, "num_experts": self.num_experts, "tokens": self.tokens}
        save_file(tensors, str(path), metadata={"moe_colab": json.dumps(meta)})

    @classmethod
    def load(cls, path) -> "RoutingTrace":
        from safetensors import safe_open
        path = Path(path)
        if path.is_dir():
            raise FileNotFoundError(f"{path} is a directory; a routing trace is one file written by "
                                    f"RoutingTrace.save")
        if not path.is_file():
            raise FileNotFoundError(f"no routing trace at {path}")
        try:
            f = safe_open(str(path), framework="pt")
        except Exception as e:     # safetensors' own error names no file
            raise ValueError(f"{path} is not a routing trace (not a safetensors file written by "
                             f"RoutingTrace.save: {e})") from None
        with f:
            raw = (f.metadata() or {}).get("moe_colab")
            if raw is None:
                raise ValueError(f"{path} is a safetensors file but not a moe_colab RoutingTrace")
            meta = json.loads(raw)
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path} has trace format {meta.get('format')!r}, expected {_FORMAT!r}")
            names = set(f.keys())
            get = lambda n: f.get_tensor(n) if n in names else None  # noqa: E731
            return cls(get("experts"), get("weights"), num_experts=meta["num_experts"],
                       token_ids=get("token_ids"), tokens=meta.get("tokens"))


# -- recording ------------------------------------------------------------------------------------
def _adapter(model):
    from ..adapters import adapter_for
    return adapter_for(model.config)


def routers(model) -> list[torch.nn.Module]:
    """Each MoE layer's router module, found through the model family's adapter (dense layers,
    e.g. DeepSeek's first or Qwen's mlp_only_layers, have none: a trace's layers are MoE layers)."""
    ad = _adapter(model)
    return [ad.router(ad.moe_block(layer)) for layer in ad.moe_decoder_layers(model)]


def _top_k_from_output(output, top_k: int):
    """(indices [T, k], weights [T, k]) from a router's output.

    transformers >= 5 routers return (logits, top-k weights, top-k indices); a bare nn.Linear
    router (older transformers) returns logits only, so redo Mixtral's softmax + top-k there.
    """
    if isinstance(output, (tuple, list)) and len(output) >= 3:
        return output[2].reshape(-1, output[2].shape[-1]), output[1].reshape(-1, output[1].shape[-1])
    logits = output[0] if isinstance(output, (tuple, list)) else output
    probs = torch.softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
    w, i = torch.topk(probs, top_k, dim=-1)
    return i, w / w.sum(dim=-1, keepdim=True)


def _as_batch_one(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(
            f"record_routing records one sequence (batch 1); got input_ids of shape {tuple(ids.shape)}. "
            f"Record each sequence separately and join them with RoutingTrace.cat if needed.")
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty: nothing to route")
    return ids


@contextmanager
def router_hooks(model):
    """Record every router call of ``model`` while the block runs.

    Yields ``calls``: per layer, a list of (indices [n, k], weights [n, k]) per router call.
    The hooks are removed on exit, also when the model raised.
    """
    top_k = _adapter(model).top_k(model.config)
    gates = routers(model)
    calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in gates]

    def hook_for(layer: int):
        def hook(module, args, output):
            i, w = _top_k_from_output(output, top_k)
            calls[layer].append((i.detach().long(), w.detach().float()))
        return hook

    handles = [g.register_forward_hook(hook_for(l)) for l, g in enumerate(gates)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def stack_calls(calls, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(experts [L, T, k], weights [L, T, k]) on the CPU from router_hooks' calls, checking that
    every layer routed exactly ``num_tokens`` tokens."""
    for layer, c in enumerate(calls):
        n = sum(i.shape[0] for i, _ in c)
        if n != num_tokens:
            raise RuntimeError(
                f"the router of layer {layer} routed {n} tokens in {len(c)} calls, expected {num_tokens}: "
                f"is it called more than once per forward (e.g. to guess experts)? Guesses must use "
                f"the router's weight (adapter.router_probs), not call the router module.")
    experts = torch.stack([torch.cat([i for i, _ in c]).cpu() for c in calls])     # [L, T, k]
    weights = torch.stack([torch.cat([w for _, w in c]).cpu() for c in calls])     # [L, T, k]
    return experts, weights


@torch.no_grad()
def record_routing(model, input_ids, *, max_new_tokens: int | None = None,
                   generate_kwargs: dict | None = None, tokenizer=None) -> RoutingTrace:
    """Run ``model`` on one sequence and return the experts every layer chose for every token.

    Without ``max_new_tokens``/``generate_kwargs``: one ordinary forward over ``input_ids``
    ([1, T] or [T]; batch > 1 is refused because tokens of different sequences are not a
    sequence). With them: ``model.generate`` (greedy unless generate_kwargs says otherwise),
    then one more decoding step for the last generated token, which generate samples but never
    feeds back; so the trace covers prompt + generated tokens, in order, exactly as a decoding
    engine routes them. ``tokenizer`` (optional) adds the token strings to the trace.
    Hooks are removed afterwards, also when the model raises.
    """
    ids = _as_batch_one(input_ids).to(model.device)
    generating = max_new_tokens is not None or generate_kwargs is not None
    with router_hooks(model) as calls:
        if not generating:
            model(input_ids=ids, use_cache=False)
            all_ids = ids[0]
        else:
            kw = {"do_sample": False, **(generate_kwargs or {})}
            if max_new_tokens is not None:
                kw["max_new_tokens"] = max_new_tokens
            kw.update(return_dict_in_generate=True, use_cache=True)
            out = model.generate(ids, **kw)
            all_ids = out.sequences[0]
            if all_ids.numel() > ids.shape[1]:
                # Route the last generated token too, through the KV cache generate returned
                # (transformers renamed past_key_values to cache in 5.2x; accept both).
                kv = getattr(out, "cache", None)
                kv = kv if kv is not None else getattr(out, "past_key_values", None)
                name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
                model(input_ids=all_ids[None, -1:], use_cache=True, **{name: kv})
    experts, weights = stack_calls(calls, all_ids.numel())
    tokens = None
    if tokenizer is not None:
        tokens = tokenizer.convert_ids_to_tokens(all_ids.tolist())
    return RoutingTrace(experts, weights, num_experts=_adapter(model).num_experts(model.config),
                        token_ids=all_ids.cpu(), tokens=tokens)
