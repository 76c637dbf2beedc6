"""load_model: a transformers MoE model whose experts live in host memory behind a device cache.

    checkpoint --(validate every shard first)--> config, adapter, OffloadOptions
    experts     packed into host buffers, one tensor read at a time (or, from a directory
                written by moe_colab.quantize, one layer's packed buffers at a time)
    trunk       embeddings, attention, norms, routers, lm_head: built by transformers on the
                meta device, then filled on the compute device
    assembled   by moe_colab.engine.build_engine, the one path every caller uses

The result is an ordinary ``PreTrainedModel``: ``generate()`` (greedy, sampling, batches,
streamers, past_key_values) works as usual, plus ``offload_stats()``, ``reset_offload_stats()``
and ``offload_options`` (the settings it was built with).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapters import adapter_for
from .checkpoint import (CheckpointError, builtin_model_path, check_tensors, iter_tensors, read_config_dict,
                         read_json_file, resolve, shard_map)
from .config import OffloadOptions
from .engine.build import Strategies, build_engine, new_store


def model_path(name: str = "tiny") -> Path:
    """Directory of a model shipped with the package (usable with transformers' from_pretrained)."""
    p = builtin_model_path(name)
    if p is None:
        raise FileNotFoundError(f"no built-in model named {name!r}")
    return p


def _check_device(device) -> torch.device:
    if isinstance(device, int) and not isinstance(device, bool):
        device = f"cuda:{device}"               # as transformers reads an int: a GPU index
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unsupported device {device!r}; use 'cuda' or 'cpu'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but CUDA is not available here; "
                           "pass device='cpu' (on Colab: Runtime -> Change runtime type -> T4 GPU)")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"unsupported device {str(device)!r}; use 'cuda' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={str(device)!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


# Compute dtypes the engine runs (fp16 on a T4; bf16 where supported; fp32/fp64 on CPU and in tests).
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}


def _check_dtype(dtype) -> torch.dtype:
    """A torch dtype (or its name, as transformers accepts) the model can compute in."""
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        name = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
                "float": "float32", "double": "float64"}.get(name, name)
        if name not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: use one of {sorted(DTYPES)} (or torch.float16, ...)")
        return DTYPES[name]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float16, got {dtype!r}")
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype={dtype} cannot run a model: use torch.float16 (a T4), torch.bfloat16 or "
                         f"torch.float32 (weights are stored in it; the matmuls compute in it)")
    return dtype


def load_model(path: str | os.PathLike, *, device="cuda", experts_on_device="auto", prefetch=2,
               quant=None, dtype=torch.float16, guess_from: str = "auto", swap: bool | None = None,
               max_context: int = 4096, progress: bool = True, cuda_graphs: bool | None = None,
               options: OffloadOptions | None = None, events=None, extra_host_rows: int | None = None):
    """Load a Mixtral-architecture checkpoint with its experts offloaded.

    path: a local directory (HF layout), a built-in name ("tiny") or a Hub id.
    experts_on_device: "auto" (default): the largest number of slots per layer that fits this
        machine (moe_colab.plan), in swap mode when the host cannot hold every expert; or a fixed
        count (1..num_experts), checked against the same plan. Either way a load that does not
        fit raises PlanError, with the numbers and what would fit, before anything is allocated.
        Budgets: $MOE_COLAB_DEVICE_BYTES / $MOE_COLAB_HOST_BYTES (e.g. "15GiB"), else measured.
    prefetch: experts of the next layer loaded speculatively (0..num_experts; 0 = off).
    guess_from: the hidden state the next layer's router guesses from: "before" or "after" this
        layer's experts; "auto" (measured best, docs/locality.md): "after" at layer 0, whose
        experts change the residual stream most, "before" elsewhere (same recall, earlier copies).
    quant: None (16-bit), a preset name ("paper-2bit", "paper-3bit") or a QuantConfig.
    swap: keep each expert either on the device or on the host, never both (host memory
        (E - k + 1) / E of the experts instead of all; one extra device-to-host copy per miss).
        None: False, unless experts_on_device="auto" finds the host too small.
    max_context: the longest sequence the plan leaves KV-cache room for.
    cuda_graphs: replay one-token calls as CUDA graphs (None: OffloadOptions' default).
    extra_host_rows: swap mode: host rows beyond layers x (E - k + 1), so that an evicted expert
        more often still has its host copy (fewer write-backs); None: what the host budget leaves
        when experts_on_device="auto", else 0.
    options: an OffloadOptions holding every engine setting (host_sync, reuse, kernels, ...);
        the arguments above, where given, replace its fields. Kept as ``model.offload_options``.
    events: a moe_colab.engine.events.EventLog to record what the cache does (timelines).
    """
    device = _check_device(device)
    dtype = _check_dtype(dtype)
    request = dict(experts_on_device=experts_on_device, prefetch=prefetch, guess_from=guess_from, swap=swap,
                   cuda_graphs=cuda_graphs, extra_host_rows=extra_host_rows, max_context=max_context,
                   options=options)
    _check_flags(request)
    directory = resolve(path)
    _check_generation_config(directory)
    strategies = Strategies(events=events)
    load = _load_quantized_dir if _is_quantized_dir(directory) else _load_checkpoint
    return load(directory, request, strategies, device=device, quant=quant, dtype=dtype, progress=progress)


def _planned_options(directory, request: dict, *, quant, device, dtype, num_experts: int) -> OffloadOptions:
    """The load's OffloadOptions, checked against the memory plan before anything is allocated:
    "auto" picks the most slots (and swap mode) that fit; a fixed count is refused with the plan's
    numbers and what would fit (PlanError)."""
    from .planner import resolve_experts_on_device
    k, swap = request["experts_on_device"], request["swap"]
    fixed = k != "auto"
    k, swap, planned_rows = resolve_experts_on_device(directory, quant, device, dtype, experts_on_device=k,
                                                      max_context=request["max_context"],
                                                      swap=bool(swap) if fixed else swap)
    extra = request["extra_host_rows"]
    if extra is None and not fixed:
        extra = planned_rows                  # what the host budget leaves, as spare swap rows
    base = request["options"] if request["options"] is not None else OffloadOptions.defaults()
    changes = dict(experts_on_device=k, prefetch=request["prefetch"], guess_from=request["guess_from"], swap=swap,
                   cuda_graphs=request["cuda_graphs"], extra_host_rows=extra if swap else None)
    return base.replace(**{n: v for n, v in changes.items() if v is not None}).validate(num_experts)


def _check_flags(request: dict) -> None:
    """Settings that need no model: a wrong type is refused here, never read as truthy
    (swap="no" would otherwise mean swap)."""
    for name in ("swap", "cuda_graphs"):
        if request[name] is not None and not isinstance(request[name], bool):
            raise TypeError(f"{name} must be True, False or None, got {request[name]!r}")
    if request["options"] is not None and not isinstance(request["options"], OffloadOptions):
        raise TypeError(f"options must be a moe_colab.OffloadOptions, got {type(request['options']).__name__}")
    k = request["experts_on_device"]
    if k != "auto" and (isinstance(k, bool) or not isinstance(k, int)):
        raise TypeError(f"experts_on_device must be an int or 'auto', got {k!r}")
    mc = request["max_context"]
    if isinstance(mc, bool) or not isinstance(mc, int) or mc < 1:
        raise ValueError(f"max_context must be a positive int (tokens), got {mc!r}")


def _check_request(request: dict, num_experts: int) -> None:
    """Bad arguments are plain errors, raised before any file is read or anything is planned."""
    k = request["experts_on_device"]
    OffloadOptions(experts_on_device=1 if k == "auto" else k, prefetch=request["prefetch"],
                   guess_from=request["guess_from"]).validate(num_experts)


def _check_generation_config(directory: Path) -> None:
    """A broken generation_config.json is named before any weight is read (build_engine reads it
    at the end, after minutes of loading on a real model)."""
    f = Path(directory) / "generation_config.json"
    if f.is_file():
        from transformers import GenerationConfig
        settings = read_json_file(f, "generation settings")
        try:
            GenerationConfig.from_dict(settings)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{f}: {e}") from e


class _RouterOnly(torch.nn.Module):
    """What is left of an MoE block in the trunk: its router and shared experts, under the names
    OffloadedMoE gives them (adapter.kept_modules)."""

    def __init__(self, kept: dict):
        super().__init__()
        for name, module in kept.items():
            self.add_module(name, module)


def _expected_trunk(adapter, config) -> tuple[dict, frozenset]:
    """({name: shape} of every trunk tensor, the names tied to another one) for this config: the
    transformers model on the meta device (nothing allocated), each MoE block reduced to its
    router as build_engine reduces it."""
    with torch.device("meta"):
        model = adapter.model_class()(config)
    for layer in adapter.moe_decoder_layers(model):         # dense layers keep their MLP
        adapter.set_moe_block(layer, _RouterOnly(adapter.kept_modules(adapter.moe_block(layer))))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for prefix, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                shapes[f"{prefix}.{name}" if prefix else name] = tuple(buf.shape)
    return shapes, frozenset(set(model.state_dict()) - set(shapes))


def _load_checkpoint(directory: Path, request: dict, strategies, *, device, quant, dtype, progress):
    """An original checkpoint (per-expert w1/w2/w3), quantized while it loads if ``quant`` asks."""
    cfg_dict = read_config_dict(directory)
    adapter = adapter_for(cfg_dict.get("model_type"))
    config = adapter.prepare_config(adapter.config_class().from_pretrained(directory))
    _check_request(request, adapter.num_experts(config))
    qcfg = None
    if quant is not None:
        from .quant.config import resolve_quant
        qcfg = resolve_quant(quant)
    if qcfg is not None:
        qcfg.validate_for(config)
        if qcfg.is_noop:
            qcfg = None
    shards = shard_map(directory)       # validates every shard before anything large exists
    options = _planned_options(directory, request, quant=quant, device=device, dtype=dtype,
                               num_experts=adapter.num_experts(config))
    # The plan first (a machine too small is told so), then every tensor's name and shape from
    # the shard headers: a checkpoint that fits but disagrees with its config is named before
    # the expert store is allocated.
    check_tensors(directory, shards, adapter, config, *_expected_trunk(adapter, config))
    from .quant.format import expert_format
    fmt = expert_format(config, qcfg, dtype, adapter.activation(config))
    store = new_store(adapter, config, fmt, options, device)

    def fill(cache, model) -> dict:
        from .convert.quantize import quantize_trunk_tensor
        total = sum(len(v) for v in shards.values())
        bar = tqdm(total=total, desc=f"loading {directory.name}", unit="tensor", disable=not progress)
        trunk = {}
        reader = adapter.expert_reader(config)      # per-expert, fused or MXFP4 -> w1/w2/w3 (+ biases)
        for name, tensor in iter_tensors(directory, shards, progress=bar):
            experts = reader.feed(name, tensor)
            if experts is not None:
                for layer, expert, w, t in experts:
                    # Quantized formats quantize each matrix as it arrives (hqq, on the CPU).
                    cache.write(layer, expert, w, t.to(dtype) if qcfg is None or w[0] == "b" else t)
                continue
            param = reader.trunk_name(name)
            if param is None:
                continue                            # transformers ignores it too
            if qcfg is not None:
                trunk.update(quantize_trunk_tensor(param, tensor, qcfg, device, adapter, config))
            else:
                trunk[param] = tensor
        bar.close()
        reader.check_complete(f"{directory}: ")
        return trunk

    return build_engine(adapter, config, store, options, device=device, dtype=dtype, fill=fill, qcfg=qcfg,
                        strategies=strategies, directory=directory)


def _load_quantized_dir(directory: Path, request: dict, strategies, *, device, quant, dtype, progress):
    """A directory written by moe_colab.quantize: packed expert buffers go straight to storage."""
    from .convert import manifest as qm

    manifest, qcfg = qm.open_quantized(directory, quant)     # raises on a different scheme
    config = qm.model_config(manifest)
    adapter = adapter_for(config)
    _check_request(request, adapter.num_experts(config))
    options = _planned_options(directory, request, quant=quant, device=device, dtype=dtype,
                               num_experts=adapter.num_experts(config))
    fmt = qm.expert_format_for(manifest, dtype, adapter.activation(config))
    store = new_store(adapter, config, fmt, options, device)

    def fill(cache, model) -> dict:
        layers = range(adapter.num_layers(config))
        for layer in tqdm(layers, desc=f"loading {directory.name}", unit="layer", disable=not progress):
            buffers = qm.load_layer_experts(directory, manifest, layer)      # uint8 [E, nbytes]
            for expert in range(buffers.shape[0]):
                cache.write_packed(layer, expert, buffers[expert])
        return qm.load_trunk_state_dict(directory, manifest)

    return build_engine(adapter, config, store, options, device=device, dtype=dtype, fill=fill, qcfg=qcfg,
                        strategies=strategies, directory=directory)


def _is_quantized_dir(directory: Path) -> bool:
    from .convert.manifest import MANIFEST   # a light import: no hqq
    return (Path(directory) / MANIFEST).is_file()
