"""The "naive offloading" baseline: the same synthetic model, offloaded the way a user would
without this package, with accelerate (infer_auto_device_map + dispatch_model).

Each MoE block keeps all of its experts' packed buffers in ONE uint8 parameter [experts, nbytes]
(the same bytes as the ExpertStore) and computes the chosen experts from its rows. accelerate
fills the device with whole decoder layers up to ``max_memory`` and offloads the rest to CPU
RAM; its hooks then copy every offloaded layer (attention + all 8 experts) to the device on
every forward and drop it afterwards. Offloaded weights sit in ordinary (pageable) memory, as
after ``from_pretrained(device_map="auto")``, unless ``pinned=True``.

On a CPU-only machine (the tests) the device is the CPU and the slower tier is the disk:
accelerate's same offload hooks then read offloaded layers from ``offload_dir``.

Bytes moved per token are counted, not assumed: a forward pre-hook on each offloaded module
counts its calls, times the bytes of its parameters and buffers.
"""
from __future__ import annotations

import psutil
import torch
from torch import nn

from ..adapters import adapter_for
from ..engine.build import keep_fp32_
from ..engine.moe_block import RouteFn, route_with_router
from ..quant.format import attach_quant_linears_
from .synthetic import synthetic_trunk_state


class NaiveMoE(nn.Module):
    """An MoE block whose experts are rows of one uint8 parameter [experts, nbytes]; the router
    and shared experts kept under their names, the family's combine and output as OffloadedMoE's."""

    def __init__(self, layer_idx: int, router: nn.Module, experts: torch.Tensor, fmt, top_k: int,
                 route: RouteFn = route_with_router, *, router_attr: str = "gate", kept=None, family=None):
        super().__init__()
        self.layer_idx, self.top_k, self.format = layer_idx, top_k, fmt
        self.router_attr, self.family = router_attr, family
        self.add_module(router_attr, router)
        for name, module in (kept or {}).items():
            self.add_module(name, module)
        self.experts = nn.Parameter(experts, requires_grad=False)
        self.route = route          # the same routing strategy as OffloadedMoE's

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])                        # [T, H]
        top_w, top_i = self.route(self.layer_idx, getattr(self, self.router_attr), x)   # [T, k] each
        flat = top_i.reshape(-1)
        counts = torch.bincount(flat, minlength=self.experts.shape[0]).tolist()
        order = torch.argsort(flat, stable=True)
        weights = top_w.reshape(-1)
        out = torch.zeros_like(x)
        start = 0
        for e, c in enumerate(counts):          # ascending expert order, as OffloadedMoE sums
            if c:
                sel = order[start:start + c]
                tokens = sel // self.top_k
                y = self.format.forward(self.format.layout.views(self.experts[e]), x[tokens])
                out.index_add_(0, tokens, (y * weights[sel, None]).to(out.dtype))
            start += c
        if self.family is None:
            return out.reshape(shape)
        return self.family.block_output(self.family.combine(self, x, out).reshape(shape), top_w)


def _materialize_(model: nn.Module, device) -> None:
    """Give every meta parameter/buffer real (uninitialised) memory on ``device``."""
    for m in model.modules():
        for n, p in list(m._parameters.items()):
            if p is not None and p.is_meta:
                m._parameters[n] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=False)
        for n, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[n] = torch.empty_like(b, device=device)


def _tensor_bytes(module: nn.Module) -> int:
    """Bytes of parameters and persistent buffers: what accelerate's offload hooks move."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def build_naive(config, qcfg, store, *, device, dtype, seed: int, max_device_bytes: int | None,
                pinned: bool = False, offload_dir=None, route: RouteFn = route_with_router):
    """(model, info): the synthetic model dispatched by accelerate under ``max_device_bytes``.

    ``max_device_bytes`` None on a CPU-only machine: 3/4 of the model.
    info: device_map, offloaded module names, offloaded bytes per forward, whether the offloaded
    weights are pinned, and ``calls`` (a dict filled by the counting hooks)."""
    try:
        from accelerate import dispatch_model, infer_auto_device_map
    except ImportError as e:
        raise RuntimeError("the naive-offloading row needs accelerate (pip install accelerate)") from e
    device = torch.device(device)
    adapter = adapter_for(config)
    cls = adapter.model_class()
    config.dtype = dtype
    with torch.device("meta"):
        model = cls(config)
    model = keep_fp32_(model.to(dtype), dtype)          # float32 routers where transformers keeps them
    attach_quant_linears_(model, qcfg, device="meta")
    for l, layer in enumerate(adapter.moe_decoder_layers(model)):     # MoE layer l: the store's layer l
        kept = adapter.kept_modules(adapter.moe_block(layer))
        router = kept.pop(adapter.router_attr)
        adapter.set_moe_block(layer, NaiveMoE(l, router, store.buffers[l], store.format, adapter.top_k(config),
                                              route=route, router_attr=adapter.router_attr, kept=kept,
                                              family=adapter))
    state = synthetic_trunk_state(model, seed, device, dtype)      # the same tensors as the engine's
    _materialize_(model, "cpu")
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for n, t in state.items():
            targets[n].copy_(t)
    del state
    adapter.reinit_buffers(model, config, "cpu")
    model.eval()

    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        max_memory = {idx: int(max_device_bytes), "cpu": int(psutil.virtual_memory().available * 0.9)}
        slow = "cpu"
    else:   # CPU-only: keep about 3/4 of the model "on the device" (RAM), the rest on disk
        if max_device_bytes is None:
            max_device_bytes = int(0.75 * _tensor_bytes(model))
        max_memory = {"cpu": int(max_device_bytes)}
        slow = "disk"
    no_split = list(getattr(model, "_no_split_modules", None) or [type(adapter.decoder_layers(model)[0]).__name__])
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                       offload_buffers=True, clean_result=False)
    # On a CPU-only machine "cpu" IS the device: only "disk" entries are offloaded there.
    offloaded = [n for n, d in device_map.items() if d == slow]
    if "" in offloaded or not offloaded:
        raise RuntimeError(f"accelerate's device map {dict(device_map)} under max_memory {max_memory} offloads "
                           f"{'everything' if offloaded else 'nothing'}: not the naive-offloading setting")
    modules = dict(model.named_modules())
    # The units whose forward runs (and so whose hook loads weights): containers expand.
    calls_on = [n for n in offloaded if not isinstance(modules[n], (nn.ModuleList, nn.ModuleDict))]
    calls_on += [f"{n}.{c}" for n in offloaded if isinstance(modules[n], (nn.ModuleList, nn.ModuleDict))
                 for c, _ in modules[n].named_children()]
    sizes = {n: _tensor_bytes(modules[n]) for n in calls_on}
    if slow == "cpu" and not pinned:   # offloaded experts into ordinary pageable memory
        for n in offloaded:
            for m in modules[n].modules():
                if isinstance(m, NaiveMoE):
                    pageable = torch.empty(m.experts.shape, dtype=m.experts.dtype)
                    pageable.copy_(m.experts.data)
                    m.experts = nn.Parameter(pageable, requires_grad=False)
    pinned_now = [m.experts.is_pinned() for n in offloaded for m in modules[n].modules() if isinstance(m, NaiveMoE)]
    if slow == "disk" and offload_dir is None:
        raise ValueError("offloading to disk (CPU-only machine) needs offload_dir")
    model = dispatch_model(model, device_map=device_map, offload_dir=str(offload_dir) if offload_dir else None,
                           offload_buffers=True)
    calls = {n: 0 for n in calls_on}

    def counter(name):
        def hook(module, args, kwargs):
            calls[name] += 1
        return hook

    for n in calls_on:
        modules[n].register_forward_pre_hook(counter(n), with_kwargs=True)
    info = {"device_map_counts": {str(d): sum(1 for v in device_map.values() if v == d) for d in set(device_map.values())},
            "offloaded_modules": offloaded, "offload_tier": slow, "offloaded_bytes": sizes,
            "offloaded_bytes_per_forward": sum(sizes.values()),
            "offloaded_experts_pinned": bool(pinned_now) and all(pinned_now),
            "max_device_bytes": int(max_device_bytes), "calls": calls}
    return model, info


def bytes_moved(info: dict) -> int:
    """Bytes accelerate brought to the device so far: calls of each offloaded module x its bytes."""
    return sum(info["calls"][n] * info["offloaded_bytes"][n] for n in info["calls"])
