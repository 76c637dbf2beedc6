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

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import OffloadOptions
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
    """Methods added to the transformers model class."""

    moe_cache: ExpertCache
    offload_options: OffloadOptions
    offload_compute: ModelCompute

    def offload_stats(self, per_layer: bool = False) -> dict:
        """Totals of hits, misses, prefetch_hits, prefetches, prefetch_wasted, bytes_to_device,
        bytes_to_host (ints); with ``per_layer=True`` also a list of the same per layer. If this
        model switched a fast path off (a failed Triton launch or CUDA-graph capture), also
        ``fallbacks``: {what: why}."""
        stats = self.moe_cache.stats(per_layer)
        if self.offload_compute.fallbacks:
            stats["fallbacks"] = self.offload_compute.report()
        return stats

    def reset_offload_stats(self) -> None:
        self.moe_cache.reset_stats()

    def save_pretrained(self, *args, **kwargs):
        raise NotImplementedError("an offloaded model keeps its experts outside the module tree; "
                                  "save the original checkpoint (or use moe_colab.quantize) instead")


_CLASSES: dict[type, type] = {}


def _offloaded_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Offloaded{base.__name__}", (OffloadedModelMixin, base), {})
    return _CLASSES[base]


def new_store(adapter, config, fmt, options: OffloadOptions, device) -> ExpertStore:
    """Host memory for every expert (pinned on CUDA); in swap mode the first k start on the device."""
    return ExpertStore(adapter.num_layers(config), adapter.num_experts(config), fmt,
                       pin=torch.device(device).type == "cuda",
                       device_first=options.experts_on_device if options.swap else 0,
                       extra_rows=options.extra_host_rows if options.swap else 0)


def build_trunk(adapter, config, dtype):
    """The transformers model on the meta device (no memory), dtype set."""
    cls = _offloaded_class(adapter.model_class())
    config.dtype = dtype
    with torch.device("meta"):
        model = cls(config)
    return model.to(dtype)


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
                        spare_slots=options.spare_slots, min_prob=options.prefetch_min_prob)
    model = build_trunk(adapter, config, dtype)
    with torch.device("meta"):
        attach_quant_linears_(model, qcfg)
    trunk_state = fill(cache, model)
    missing = store.missing()
    if missing:
        where = f"{directory}: " if directory is not None else ""
        raise ValueError(f"{where}expert weights missing, e.g. {[adapter.expert_key(*m) for m in missing[:3]]}")

    layers = adapter.decoder_layers(model)
    top_k = adapter.top_k(config)
    for l, layer in enumerate(layers):
        router = adapter.router(adapter.moe_block(layer))
        adapter.set_moe_block(layer, OffloadedMoE(l, router, cache, store.format, top_k, store.num_experts,
                                                  route=strategies.route))
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
                guess_fn=strategies.guess)
    model.moe_cache, model.offload_options, model.offload_compute = cache, options, compute
    model.eval()
    model.requires_grad_(False)
    if directory is not None:
        _attach_generation_config(model, directory)
    return model


def load_trunk(model, state: dict, device, directory=None) -> None:
    """Copy every trunk tensor into its parameter or persistent buffer; name what does not fit."""
    params = dict(model.named_parameters())
    for prefix, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                params[f"{prefix}.{name}" if prefix else name] = buf
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
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        loaded |= {n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight}
    missing = [n for n in params if n not in loaded]
    if missing:
        raise ValueError(f"{directory}: the checkpoint lacks {missing[:3]}")


def _attach_generation_config(model, directory) -> None:
    from transformers import GenerationConfig

    if (Path(directory) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
