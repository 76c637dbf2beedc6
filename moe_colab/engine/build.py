"""build_engine: the one path that assembles an offloaded model, whatever the weights come from.

    store   = new_store(adapter, config, fmt, options, device)   # experts' host memory
    model   = build_engine(adapter, config, store, options, device=..., dtype=..., fill=fill)

    1. ModelCompute(options)                  per-model kernel and CUDA-graph choices
    2. ExpertCache over the store             device slots, copy stream, host sync
    3. the transformers model on the meta device (no memory); low-bit attention shells
    4. fill(cache, model) -> trunk tensors    the caller's source writes every expert into the
                                              store (through the cache: in swap mode some start
                                              in device slots) and returns the trunk's tensors
    5. each MoE block replaced by OffloadedMoE (router kept, format, cache, speculator)
    6. the trunk materialised on the device and loaded; options kept on the model

Callers: moe_colab.model.load_model (an original checkpoint, or a quantized directory) and the
benchmark (synthetic weights). Benchmark-only behaviour (a routing replay) comes in through
``Strategies``, never through a flag in the forward pass.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import BATCH_MIN_TOP_K, OffloadOptions
from .cache import ExpertCache
from .compute import ModelCompute
from .moe_block import OffloadedMoE, RouteFn, route_with_router
from .prefetch import GuessFn, Speculator, guess_source
from .storage import ExpertStore


@dataclass(frozen=True)
class Strategies:
    """Who routes, who guesses and who watches; the defaults are the model's own router, the
    next layer's router, and no event log (engine/events.py)."""
    route: RouteFn = route_with_router
    guess: GuessFn | None = None
    events: object = None


class OffloadedModelMixin:
    """Methods added to the transformers model class.

    One forward at a time: the expert cache (slots, LRU order, copy streams, queued guesses, and
    in swap mode the only copy of some experts) is state that one forward changes layer by
    layer, so ``forward`` holds ``offload_lock`` (a re-entrant lock) from its first layer to its
    last. ``generate`` calls forward once per token: generate calls from several threads take
    turns token by token, each with its own KV cache, and each gets what it would get alone.
    Statistics are read and reset under the same lock.

    Inference only: the experts are packed buffers in the ExpertStore, outside the module tree
    and autograd. ``.to()``/``.half()``/``.cuda()``... that would change the device or dtype
    refuse (they could convert only the trunk); a no-op ``.to()`` (the same device and dtype,
    as pipelines call it) is allowed. ``.train()`` and ``requires_grad_(True)`` refuse.
    """

    moe_cache: ExpertCache
    offload_options: OffloadOptions
    offload_compute: ModelCompute

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.offload_lock = threading.RLock()

    def offload_stats(self, per_layer: bool = False) -> dict:
        """Totals of hits, misses, prefetch_hits, prefetches, prefetch_wasted, bytes_to_device,
        bytes_to_host (ints); with ``per_layer=True`` also a list of the same per layer. If this
        model switched a fast path off (a failed Triton launch or CUDA-graph capture), also
        ``fallbacks``: {what: why}."""
        with self.offload_lock:        # between forwards: counters of whole tokens
            stats = self.moe_cache.stats(per_layer)
        if self.offload_compute.fallbacks:
            stats["fallbacks"] = self.offload_compute.report()
        return stats

    def reset_offload_stats(self) -> None:
        with self.offload_lock:
            self.moe_cache.reset_stats()

    def save_pretrained(self, *args, **kwargs):
        raise NotImplementedError("an offloaded model keeps its experts outside the module tree; "
                                  "save the original checkpoint (or use moe_colab.quantize) instead")

    def _check_prompt(self, ids: torch.Tensor) -> None:
        """A prompt (more than one token per row: decoding steps only feed back tokens the model
        sampled) whose ids the embedding cannot look up. On CUDA it would end in a device-side
        assert that leaves the CUDA context unusable (on Colab: restart the runtime); one small
        host sync per prompt avoids that."""
        if ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {list(ids.shape)}): give at least one token")
        if ids.is_floating_point() or ids.is_complex():
            return                        # transformers' own error names the dtype
        lo, hi = (int(v) for v in torch.aminmax(ids))
        vocab = self.get_input_embeddings().num_embeddings
        if lo < 0 or hi >= vocab:
            bad = hi if hi >= vocab else lo
            raise ValueError(f"input_ids holds token id {bad}, outside this model's vocabulary 0..{vocab - 1}: "
                             f"was it tokenized with another model's tokenizer?")

    # -- inference only ------------------------------------------------------------------------
    def _built(self) -> bool:
        return self.__dict__.get("moe_cache") is not None

    def _apply(self, fn, recurse=True):
        # .to/.half/.float/.bfloat16/.cuda/.cpu/.type all come here. Ask fn what it would do to
        # a trunk tensor: a change of device or dtype would leave the experts behind.
        if self._built():
            p = self.get_input_embeddings().weight      # in the model dtype (some routers stay fp32)
            try:
                probe = fn(torch.empty(0, dtype=p.dtype, device=p.device))
                target = f"{str(probe.dtype).removeprefix('torch.')} on {probe.device}"
                changes = probe.dtype != p.dtype or probe.device != p.device
            except Exception as e:       # e.g. .cuda() where torch has no CUDA
                target, changes = f"({type(e).__name__}: {e})", True
            if changes:
                have = f"{str(p.dtype).removeprefix('torch.')} on {p.device}"
                raise RuntimeError(f"an offloaded model cannot change device or dtype after loading (it holds "
                                   f"{have}, this asks for {target}): its experts are packed for {have} in host "
                                   f"memory, outside the module tree; load it again with "
                                   f"moe_colab.load_model(path, device=..., dtype=...)")
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        if mode and self._built():
            raise RuntimeError("an offloaded model is for inference only: its experts are packed buffers outside "
                               "autograd, so it cannot be trained; fine-tune the original checkpoint with "
                               "transformers and load the result with moe_colab.load_model")
        return super().train(mode)

    def requires_grad_(self, requires_grad: bool = True):
        if requires_grad and self._built():
            raise RuntimeError("an offloaded model is for inference only: its experts are outside autograd and "
                               "receive no gradients; fine-tune the original checkpoint with transformers")
        return super().requires_grad_(requires_grad)


_CLASSES: dict[type, type] = {}


def _one_at_a_time(forward):
    """``forward`` under the model's offload_lock (see OffloadedModelMixin). functools.wraps keeps
    its signature visible: generate inspects it to learn which arguments the model takes."""
    @functools.wraps(forward)
    def locked_forward(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and ids.dim() >= 1 and ids.shape[-1] != 1:
            self._check_prompt(ids)
        with self.offload_lock:
            return forward(self, *args, **kwargs)
    return locked_forward


def _offloaded_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Offloaded{base.__name__}", (OffloadedModelMixin, base),
                              {"forward": _one_at_a_time(base.forward)})
    return _CLASSES[base]


def new_store(adapter, config, fmt, options: OffloadOptions, device) -> ExpertStore:
    """Host memory for every expert (pinned on CUDA); in swap mode the first k start on the device."""
    return ExpertStore(adapter.num_layers(config), adapter.num_experts(config), fmt,
                       pin=torch.device(device).type == "cuda",
                       device_first=options.experts_on_device if options.swap else 0,
                       extra_rows=options.extra_host_rows if options.swap else 0)


def build_trunk(adapter, config, dtype):
    """The transformers model on the meta device (no memory), dtype set; what transformers keeps
    in float32 under a 16-bit load stays float32 (keep_fp32_)."""
    cls = _offloaded_class(adapter.model_class())
    config.dtype = dtype
    with torch.device("meta"):
        model = cls(config)
    return keep_fp32_(model.to(dtype), dtype)


def keep_fp32_(model, dtype):
    """Parameters and buffers that transformers' from_pretrained keeps in float32 (DeepSeek's
    routers and V3's correction bias under fp16 and bf16, GPT-OSS's norms under fp16), back to
    float32, as its dtype plan does: ``_keep_in_fp32_modules`` for fp16, ``_keep_in_fp32_modules_strict``
    for fp16 and bf16, each a pattern searched in the parameter's name. Returns the model."""
    import re

    patterns = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) if dtype in (
        torch.float16, torch.bfloat16) else set()
    if dtype == torch.float16:
        patterns |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if not patterns:
        return model
    keep = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in sorted(patterns)))
    for prefix, module in model.named_modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                full = f"{prefix}.{name}" if prefix else name
                if t is not None and t.is_floating_point() and t.dtype != torch.float32 and keep.search(full):
                    t32 = t.to(torch.float32)
                    table[name] = torch.nn.Parameter(t32, requires_grad=False) if table is module._parameters else t32
    return model


def build_engine(adapter, config, store: ExpertStore, options: OffloadOptions, *, device, dtype,
                 fill: Callable[[ExpertCache, torch.nn.Module], dict], qcfg=None,
                 strategies: Strategies = Strategies(), directory: Path | None = None):
    """The offloaded model (see the module docstring). ``options`` must be validated."""
    from ..quant.format import attach_quant_linears_, bind_compute_

    device = torch.device(device)
    if store.swap != options.swap:
        raise ValueError(f"the store is in {'swap' if store.swap else 'copy'} mode but options.swap={options.swap}")
    compute = ModelCompute(options.kernels, options.cuda_graphs)
    store.format.compute = compute
    cache = ExpertCache(store, options.experts_on_device, device, reuse=options.reuse,
                        host_sync=options.host_sync, events=strategies.events,
                        spare_slots=options.spare_slots,
                        min_prob=options.prefetch_min_share / store.num_experts)
    model = build_trunk(adapter, config, dtype)
    with torch.device("meta"):
        attach_quant_linears_(model, qcfg)
    trunk_state = fill(cache, model)
    missing = store.missing()
    if missing:
        where = f"{directory}: " if directory is not None else ""
        moe = adapter.moe_layers(config)
        raise ValueError(f"{where}expert weights missing, e.g. "
                         f"{[adapter.expert_key(moe[l], e, w) for l, e, w in missing[:3]]}")

    # Only the MoE layers' blocks are replaced (dense layers keep their MLP); MoE layer l is the
    # cache's layer l. The router and shared experts stay, under their names.
    layers = adapter.moe_decoder_layers(model)
    top_k = adapter.top_k(config)
    batched = options.batched_experts if options.batched_experts is not None else top_k >= BATCH_MIN_TOP_K
    for l, layer in enumerate(layers):
        kept = adapter.kept_modules(adapter.moe_block(layer))
        router = kept.pop(adapter.router_attr)
        adapter.set_moe_block(layer, OffloadedMoE(l, router, cache, store.format, top_k, store.num_experts,
                                                  route=strategies.route, router_attr=adapter.router_attr,
                                                  kept=kept, family=adapter, batched=batched))
    model.to_empty(device=device)
    load_trunk(model, trunk_state, device, directory)
    del trunk_state
    adapter.reinit_buffers(model, config, device)
    bind_compute_(model, compute)
    if options.prefetch:
        for l in range(len(layers) - 1):
            layer, nxt = layers[l], layers[l + 1]
            adapter.moe_block(layer).speculator = Speculator(
                l, options.prefetch, guess_source(options.guess_from, l), adapter.pre_moe_norm(layer),
                adapter.pre_moe_norm(nxt), adapter.router(adapter.moe_block(nxt)), store.num_experts,
                guess_fn=strategies.guess, probs=adapter.router_probs)
    model.moe_cache, model.offload_options, model.offload_compute = cache, options, compute
    model.eval()
    model.requires_grad_(False)
    if directory is not None:
        _attach_generation_config(model, directory)
    return model


def load_trunk(model, state: dict, device, directory=None) -> None:
    """Copy every trunk tensor into its parameter or persistent buffer; name what does not fit."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied:
        # to_empty gave lm_head its own tensor: tie it again first, so it is one parameter that
        # the file need not hold (transformers ignores a tied copy in the file too).
        model.tie_weights()
    params = dict(model.named_parameters())
    for prefix, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                params[f"{prefix}.{name}" if prefix else name] = buf
    if tied:
        aliases = set(model.state_dict()) - set(params)          # lm_head.weight
        state = {k: v for k, v in state.items() if k not in aliases}
    unexpected = [k for k in state if k not in params]
    if unexpected:
        raise ValueError(f"{directory}: tensors that fit no parameter of the model, e.g. {unexpected[:3]}")
    loaded = set()
    with torch.no_grad():
        for name, tensor in state.items():
            p = params[name]
            if tuple(p.shape) != tuple(tensor.shape):
                raise ValueError(f"{directory}: {name} has shape {tuple(tensor.shape)}, "
                                 f"the config needs {tuple(p.shape)}")
            p.copy_(tensor.to(device=device, dtype=p.dtype))
            loaded.add(name)
    missing = [n for n in params if n not in loaded]
    if missing:
        raise ValueError(f"{directory}: the checkpoint lacks {missing[:3]}")


def _attach_generation_config(model, directory) -> None:
    from transformers import GenerationConfig

    if (Path(directory) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
