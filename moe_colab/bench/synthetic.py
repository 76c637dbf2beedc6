"""Mixtral-8x7B's real shapes with synthetic low-bit weights, assembled from the engine's pieces.

No checkpoint, and never a 16-bit copy of the experts: each layer's ExpertStore buffer
(uint8 [experts, nbytes], pinned on CUDA) is filled in the quantized layout directly, one layer
at a time, by random generators on the compute device (fast on a GPU), then copied into place:

    codes  q4 | q2 | q1          uniform random bytes (every byte is valid packed codes)
    s_q    uniform in [40, 60]   with s_scale = S / 50, s_zero = 0: S within 20% of the target
    z_q    uniform in [120, 136] with z_scale = mid / 128, z_zero = 0: Z near the middle code
    target S = 1 / (sqrt(in_features) * std of a uniform code): weights of std ~ 1/sqrt(in)

Attention projections are QuantLinear modules filled the same way; embeddings, lm_head, routers
(and norms = 1) are random 16-bit. Every tensor comes from a generator seeded by (seed, name) on
the compute device, so the naive-offloading model gets bit-identical weights.

    store = make_store(config, qcfg, device, dtype, seed)
    model = build_offloaded(config, qcfg, store, OffloadOptions(experts_on_device=4, prefetch=2), ...)

goes through the same moe_colab.engine.build_engine as load_model; only the weights' source differs.
"""
from __future__ import annotations

import math
import zlib

import torch

from ..adapters import adapter_for
from ..config import OffloadOptions, mixtral_config
from ..engine.build import Strategies, build_engine
from ..engine.cache import ExpertCache
from ..engine.storage import ExpertStore
from ..quant.format import QuantLinear, QuantizedExpertFormat, expert_format

# --scale: Mixtral-8x7B itself, or smaller shapes (8 experts, top-2 kept) for smoke tests.
SCALES = {
    "full": {},
    "small": dict(num_hidden_layers=4, hidden_size=1024, intermediate_size=3584,
                  num_attention_heads=8, num_key_value_heads=2),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
}
ROUTER_STD = 2.0    # router logits ~ N(0, 2^2): input-dependent, fairly decisive routing


def bench_config(scale: str = "full", layers: int | None = None):
    if scale not in SCALES:
        raise ValueError(f"unknown --scale {scale!r}; choose one of {sorted(SCALES)}")
    over = dict(SCALES[scale])
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be >= 1, got {layers}")
        over["num_hidden_layers"] = layers
    return mixtral_config("mixtral-8x7b", **over)


def generator(seed: int, name: str, device) -> torch.Generator:
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return g


def fill_quant_(tensors: dict[str, torch.Tensor], bits: int, in_features: int, g: torch.Generator) -> None:
    """Fill the stored tensors of one low-bit matrix (names q4|q2|q1, s_q, s_scale, ...; any
    leading dimensions, e.g. [experts, ...]) with random codes and sane scales and zeros."""
    levels = 1 << bits
    code_std = math.sqrt((levels * levels - 1) / 12)             # std of a uniform code
    target = 1.0 / (math.sqrt(in_features) * code_std)
    for name, t in tensors.items():
        if name in ("q4", "q2", "q1"):
            t.random_(0, 256, generator=g)
        elif name == "s_q":
            t.random_(40, 61, generator=g)
        elif name == "z_q":
            t.random_(120, 137, generator=g)
        elif name == "s_scale":
            t.fill_(target / 50)
        elif name == "z_scale":
            t.fill_((levels - 1) / 2 / 128)
        elif name in ("s_zero", "z_zero"):
            t.zero_()
        else:
            raise KeyError(f"unexpected quantized tensor name {name!r}")


def layer_experts(fmt: QuantizedExpertFormat, num_experts: int, layer: int, seed: int, device,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [experts, nbytes]: one layer's synthetic experts in ``fmt``'s layout (into ``out``)."""
    buf = torch.zeros(num_experts, fmt.layout.nbytes, dtype=torch.uint8, device=device) if out is None else out.zero_()
    in_features = {"w1": fmt.hidden, "w3": fmt.hidden, "w2": fmt.intermediate}
    for name in fmt.names:
        cols = {s.name.split(".", 1)[1]: buf[:, s.offset:s.offset + s.nbytes].view(s.dtype)
                for s in fmt.layout.specs if s.name.startswith(name + ".")}       # [E, numel] each
        fill_quant_(cols, fmt.bits, in_features[name], generator(seed, f"experts.{layer}.{name}", device))
    return buf


def fill_store_(store: ExpertStore, seed: int, device, progress=None, cache: ExpertCache | None = None) -> None:
    """Fill every expert of ``store``: generated on ``device`` (fast on a GPU), then copied to the
    host rows; in swap mode through ``cache.write_packed`` (some experts start in device slots)."""
    device = torch.device(device)
    for layer in range(store.num_layers):
        host = store.buffers[layer]                                      # [rows, nbytes]
        in_place = cache is None and device.type == "cpu"
        buf = layer_experts(store.format, store.num_experts, layer, seed, device, out=host if in_place else None)
        if cache is not None:
            for e in range(store.num_experts):
                cache.write_packed(layer, e, buf[e])
        else:
            if not in_place:
                host.copy_(buf)
            for e in range(store.num_experts):
                store.written[layer][e].update(("w1", "w2", "w3"))
        if progress is not None:
            progress(layer)


def trunk_tensor(name: str, shape, dtype, hidden: int, seed: int, device) -> torch.Tensor:
    """A 16-bit trunk parameter by name: norms 1, embeddings N(0,1), lm_head and routers scaled."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    g = generator(seed, name, device)
    t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
    if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
        t *= ROUTER_STD / math.sqrt(hidden)
    elif not name.endswith("embed_tokens.weight"):
        t /= math.sqrt(hidden)
    return t.to(dtype)


def synthetic_trunk_state(model, seed: int, device, dtype) -> dict[str, torch.Tensor]:
    """Every trunk tensor of ``model`` (meta is fine) by name, generated on ``device``: 16-bit
    parameters, and the QuantLinear buffers of the attention projections. Experts excluded."""
    hidden = model.config.hidden_size
    state = {n: trunk_tensor(n, p.shape, dtype, hidden, seed, device)
             for n, p in model.named_parameters() if ".mlp.experts" not in n}
    for prefix, module in model.named_modules():   # persistent buffers (DeepSeek-V3's correction bias): zeros
        for n, b in module.named_buffers(recurse=False):
            if b is not None and n not in module._non_persistent_buffers_set:
                state[f"{prefix}.{n}"] = torch.zeros(b.shape, dtype=dtype, device=device)
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            mat = {k: torch.empty(v.shape, dtype=v.dtype, device=device) for k, v in m.matrix().items()}
            fill_quant_(mat, m.bits, m.in_features, generator(seed, name, device))
            state.update({f"{name}.{k}": v for k, v in mat.items()})
    return state


def make_store(config, qcfg, device, dtype, seed: int, progress=None, device_first: int = 0,
               fill: bool = True, extra_rows: int = 0) -> ExpertStore:
    """An ExpertStore of synthetic experts (copy mode; swap mode with ``device_first`` = k, then
    filled by build_offloaded through its cache)."""
    adapter = adapter_for(config)              # any family: its MoE layers, experts and expert format
    qcfg.validate_for(config)
    fmt = expert_format(config, qcfg, dtype)
    store = ExpertStore(adapter.num_layers(config), adapter.num_experts(config), fmt,
                        pin=torch.device(device).type == "cuda", device_first=device_first, extra_rows=extra_rows)
    if fill and not device_first:
        fill_store_(store, seed, device, progress)
    return store


def build_offloaded(config, qcfg, store: ExpertStore, options: OffloadOptions, *, device, dtype, seed: int = 0,
                    strategies: Strategies = Strategies(), progress=None):
    """The engine's model over ``store`` with synthetic trunk weights, assembled by build_engine
    (as load_model does, without a checkpoint). A swap-mode store is filled here, through the
    cache (its first experts live in device slots); a copy-mode store is shared as it is."""
    adapter = adapter_for(config)
    options = options.validate(adapter.num_experts(config))

    def fill(cache, model) -> dict:
        if store.swap:
            fill_store_(store, seed, device, progress, cache=cache)
        return synthetic_trunk_state(model, seed, device, dtype)

    return build_engine(adapter, config, store, options, device=device, dtype=dtype, fill=fill, qcfg=qcfg,
                        strategies=strategies)
