"""load_model: a transformers Mixtral whose experts live in host memory behind an LRU cache.

    checkpoint --(validate every shard first)--> config
    trunk (embeddings, attention, norms, routers, lm_head)   built by transformers on the
                                                             meta device, then filled on the
                                                             compute device
    experts                                                  packed into host buffers, one
                                                             tensor read at a time
    each MoE block                                           replaced by OffloadedMoE

The result is an ordinary ``PreTrainedModel``: ``generate()`` (greedy, sampling, batches,
streamers, past_key_values) works as usual, plus ``offload_stats()`` and
``reset_offload_stats()``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapters import adapter_for
from .engine.cache import ExpertCache
from .checkpoint import builtin_model_path, iter_tensors, read_config_dict, resolve, shard_map
from .config import OffloadConfig
from .engine.moe_block import OffloadedMoE
from .engine.prefetch import Speculator
from .engine.storage import DenseExpertFormat, ExpertStore


class OffloadedModelMixin:
    """Methods added to the transformers model class."""

    moe_cache: ExpertCache

    def offload_stats(self, per_layer: bool = False) -> dict:
        """Totals of hits, misses, prefetch_hits, prefetches, prefetch_wasted, bytes_to_device
        (ints); with ``per_layer=True`` also a list of the same per layer."""
        return self.moe_cache.stats(per_layer)

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


def model_path(name: str = "tiny") -> Path:
    """Directory of a model shipped with the package (usable with transformers' from_pretrained)."""
    p = builtin_model_path(name)
    if p is None:
        raise FileNotFoundError(f"no built-in model named {name!r}")
    return p


def _check_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but CUDA is not available here; "
                           "pass device='cpu' (on Colab: Runtime -> Change runtime type -> T4 GPU)")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"unsupported device {device}; use 'cuda' or 'cpu'")
    return device


def load_model(path: str | os.PathLike, *, device="cuda", experts_on_device=4, prefetch=2,
               quant=None, dtype=torch.float16, guess_from: str = "auto", swap: bool | None = None,
               max_context: int = 4096, progress: bool = True):
    """Load a Mixtral-architecture checkpoint with its experts offloaded.

    path: a local directory (HF layout), a built-in name ("tiny") or a Hub id.
    experts_on_device: LRU slots per layer on the compute device (1..num_experts), or "auto":
        the largest number that fits this machine (moe_colab.plan), which also picks swap mode
        when the host cannot hold every expert; raises PlanError before allocating if nothing fits.
    prefetch: experts of the next layer loaded speculatively (0..num_experts; 0 = off).
    guess_from: the hidden state the next layer's router guesses from: "before" or "after" this
        layer's experts; "auto" (measured best, docs/locality.md): "after" at layer 0, whose
        experts change the residual stream most, "before" elsewhere (same recall, earlier copies).
    quant: None (16-bit), a preset name ("paper-2bit", "paper-3bit") or a QuantConfig.
    swap: keep each expert either on the device or on the host, never both (host memory
        (E - k + 1) / E of the experts instead of all; one extra device-to-host copy per miss).
        None: False, unless experts_on_device="auto" finds the host too small.
    max_context: the longest sequence the "auto" plan leaves KV-cache room for.
    """
    directory = resolve(path)
    device = _check_device(device)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    if experts_on_device == "auto":
        from .planner import resolve_experts_on_device
        experts_on_device, swap = resolve_experts_on_device(directory, quant, device, dtype, swap=swap,
                                                            max_context=max_context)
    swap = bool(swap)
    if _is_quantized_dir(directory):
        return _load_quantized_dir(directory, device=device, experts_on_device=experts_on_device,
                                   prefetch=prefetch, quant=quant, dtype=dtype, guess_from=guess_from,
                                   swap=swap, progress=progress)
    cfg_dict = read_config_dict(directory)
    adapter = adapter_for(cfg_dict.get("model_type"))
    config = adapter.config_class().from_pretrained(directory)
    num_experts = adapter.num_experts(config)
    OffloadConfig(experts_on_device, prefetch, guess_from).validate(num_experts)
    qcfg = None
    if quant is not None:
        from .quant.config import resolve_quant
        qcfg = resolve_quant(quant)
        qcfg.validate_for(config)

    shards = shard_map(directory)       # validates every shard before anything large exists
    fmt = _expert_format(adapter, config, qcfg, dtype)
    model = build_trunk(adapter, config, dtype)
    store = ExpertStore(adapter.num_layers(config), num_experts, fmt, pin=device.type == "cuda",
                        device_first=experts_on_device if swap else 0)
    cache = ExpertCache(store, experts_on_device, device)

    total = sum(len(v) for v in shards.values())
    bar = tqdm(total=total, desc=f"loading {directory.name}", unit="tensor", disable=not progress)
    trunk_state = {}
    for name, tensor in iter_tensors(directory, shards, progress=bar):
        key = adapter.parse_expert_key(name)
        if key is not None:
            layer, expert, w = key
            # Quantized formats quantize each matrix as it arrives (hqq, on the CPU).
            cache.write(layer, expert, w, tensor.to(dtype) if qcfg is None else tensor)
        elif adapter.is_fused_expert_key(name):
            raise ValueError(f"{directory}: fused expert tensor {name!r}; this loader reads the original "
                             f"per-expert w1/w2/w3 layout")
        else:
            trunk_state[adapter.trunk_key(name)] = tensor
    bar.close()
    missing = store.missing()
    if missing:
        raise ValueError(f"{directory}: expert weights missing from the checkpoint, e.g. "
                         f"{[adapter.expert_key(*m) for m in missing[:3]]}")
    model = attach_experts(model, adapter, config, cache, trunk_state, device=device,
                           prefetch=prefetch, guess_from=guess_from, directory=directory)
    if qcfg is not None:
        from .quant.format import quantize_trunk_
        quantize_trunk_(model, qcfg, device=device)
    return model


def _expert_format(adapter, config, qcfg, dtype):
    if qcfg is None or qcfg.expert_bits == 16:
        return DenseExpertFormat(config.hidden_size, config.intermediate_size, dtype,
                                 adapter.activation(config))
    from .quant.format import expert_format
    return expert_format(config, qcfg, dtype, adapter.activation(config))


def _load_quantized_dir(directory, *, device, experts_on_device, prefetch, quant, dtype, guess_from,
                        swap, progress):
    """A directory written by moe_colab.quantize: packed expert buffers go straight to storage."""
    from .convert import manifest as qm
    from .quant.format import attach_quant_linears_

    manifest, qcfg = qm.open_quantized(directory, quant)     # raises on a different scheme
    config = qm.model_config(manifest)
    adapter = adapter_for(config)
    num_experts = adapter.num_experts(config)
    OffloadConfig(experts_on_device, prefetch, guess_from).validate(num_experts)
    fmt = qm.expert_format_for(manifest, dtype, adapter.activation(config))
    model = build_trunk(adapter, config, dtype)
    with torch.device("meta"):
        attach_quant_linears_(model, qcfg)
    store = ExpertStore(adapter.num_layers(config), num_experts, fmt, pin=device.type == "cuda",
                        device_first=experts_on_device if swap else 0)
    cache = ExpertCache(store, experts_on_device, device)
    layers = range(adapter.num_layers(config))
    for layer in tqdm(layers, desc=f"loading {directory.name}", unit="layer", disable=not progress):
        buffers = qm.load_layer_experts(directory, manifest, layer)      # uint8 [E, nbytes]
        for expert in range(num_experts):
            cache.write_packed(layer, expert, buffers[expert])
    trunk_state = qm.load_trunk_state_dict(directory, manifest)
    return attach_experts(model, adapter, config, cache, trunk_state, device=device,
                          prefetch=prefetch, guess_from=guess_from, directory=directory)


def _is_quantized_dir(directory: Path) -> bool:
    from .convert.manifest import MANIFEST   # a light import: no hqq
    return (Path(directory) / MANIFEST).is_file()


def build_trunk(adapter, config, dtype):
    """The transformers model on the meta device (no memory), dtype set."""
    cls = _offloaded_class(adapter.model_class())
    config.dtype = dtype
    with torch.device("meta"):
        model = cls(config)
    return model.to(dtype)


def attach_experts(model, adapter, config, cache: ExpertCache, trunk_state: dict, *, device,
                   prefetch: int, guess_from: str, directory=None):
    """Swap in OffloadedMoE blocks, materialise the trunk on ``device`` and load its weights."""
    store = cache.store
    layers = adapter.decoder_layers(model)
    top_k = adapter.top_k(config)
    for l, layer in enumerate(layers):
        router = adapter.router(adapter.moe_block(layer))
        adapter.set_moe_block(layer, OffloadedMoE(l, router, cache, top_k, store.num_experts))
    model.to_empty(device=device)
    _load_trunk(model, trunk_state, device, directory)
    adapter.reinit_buffers(model, config, device)
    for l, layer in enumerate(layers):
        if prefetch and l + 1 < len(layers):
            nxt = layers[l + 1]
            source = guess_from if guess_from != "auto" else ("after" if l == 0 else "before")
            adapter.moe_block(layer).speculator = Speculator(
                l, prefetch, source, cache, adapter.pre_moe_norm(layer),
                adapter.pre_moe_norm(nxt), adapter.router(adapter.moe_block(nxt)))
    model.moe_cache = cache
    model.eval()
    model.requires_grad_(False)
    if directory is not None:
        _attach_generation_config(model, directory)
    return model


def _load_trunk(model, state: dict, device, directory) -> None:
    # Parameters and persistent buffers (quantized projections keep their codes in buffers).
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
