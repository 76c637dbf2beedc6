"""The memory planner: how many experts per layer fit on the device, before anything is allocated.

    plan("mixtral-8x7b", quant="paper-2bit", device_bytes=15 * 2**30, host_bytes=12.7e9)

A model needs, on the compute device (batch 1, the model dtype):

    trunk       embeddings, lm_head, attention (low-bit or 16-bit), routers, norms
    cache       layers x experts_on_device slots of one packed expert each
    KV cache    2 x layers x kv_heads x head_dim x max_context values
    workspace   activations of one prefill of max_context tokens, one dequantized expert
                matrix, one extra layer of KV (the cache grows by concatenation), logits
    margin      max(256 MiB, 5% of the budget): allocator fragmentation, the CUDA context
                when the budget is the card's total, and whatever the estimate misses

and in host memory (pinned on CUDA):

    copy mode   every expert: layers x E x expert_bytes
    swap mode   about (E - k)/E of the experts: layers x (E - k + 1) x expert_bytes, plus
                spare host rows from what the budget leaves (fewer write-backs), and on the
                device SPARE_SLOTS slots shared by all layers (loads never wait for a write-back)
    reserve     the process: 1 GiB when the host budget is given (torch, CUDA's host side,
                tokenizer), 256 MiB when it is measured (``available`` already excludes the
                running process); plus the loading peak (today's loader holds the whole trunk
                and one layer of experts in host memory before they move)
    rounding    torch's pinned allocator rounds each request up to a power of two, and the
                store pins one tensor per layer: the plan counts the rounded bytes

The plan takes the largest experts_on_device (k) that fits, in copy mode if the full host copy
fits, else in swap mode (slower: an evicted expert is copied back). On a CPU device, device and
host are one pool. Nothing is allocated here; when nothing fits, ``PlanError`` says what was
needed, what was available and what to change.

Why k >= top_k by default: with fewer slots than experts per token, a token's own experts evict
each other inside one layer, so nothing survives to the next token and every use is a miss (the
engine still runs, in waves); pass min_experts_on_device=1 to accept that.

Reference: Eliseev & Mazur, arXiv 2312.17238, sections 3.1-3.3 (4 of 8 experts on a T4).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .memory import (expert_bytes, kv_cache_bytes, parse_bytes, pinned_allocation_bytes, trunk_bytes,
                     workspace_bytes)

GiB = 2**30
MiB = 2**20
DEVICE_MARGIN_MIN = 256 * MiB
DEVICE_MARGIN_FRACTION = 0.05
HOST_PROCESS_RESERVE = 1 * GiB       # a given host budget: the process itself (torch, CUDA, tokenizer)
HOST_GROWTH_RESERVE = 256 * MiB      # a measured budget already excludes the running process
COLAB_T4 = dict(device_bytes=15 * GiB, host_bytes=int(12.7e9))   # the free tier, as advertised
SPARE_SLOTS = 2                      # swap mode's shared device slots (OffloadOptions.spare_slots)


SCALING_HINT = ("for more throughput or a model beyond one machine's memory: serve the original checkpoint "
                "with vLLM or SGLang across GPUs (tensor or expert parallelism); docs/scaling.md has the "
                "command for each family")


class PlanError(ValueError):
    """Nothing fits: raised before any allocation, with the numbers and what to change."""


@dataclass(frozen=True, repr=False)
class Plan:
    model: str
    scheme: str                 # quantization scheme name ("16-bit", "paper-2bit", ...)
    device: str                 # "cuda" or "cpu" (one pool with the host)
    dtype: str
    num_layers: int
    num_experts: int
    top_k: int
    max_context: int
    expert_bytes: int           # one packed expert, as stored and copied
    experts_on_device: int
    swap: bool
    spare_slots: int            # swap mode: device slots shared by all layers
    extra_host_rows: int        # swap mode: host rows beyond layers x (E - k + 1), from the spare budget
    trunk_bytes: int            # device
    cache_bytes: int            # device: layers x experts_on_device x expert_bytes
    kv_bytes: int               # device: KV cache for max_context tokens, batch 1
    workspace_bytes: int        # device: activations and temporaries
    device_margin_bytes: int
    device_budget: int
    host_expert_bytes: int      # pinned host memory for the experts
    host_reserve_bytes: int     # the process and the loading peak
    host_budget: int

    @property
    def device_total(self) -> int:
        return self.trunk_bytes + self.cache_bytes + self.kv_bytes + self.workspace_bytes

    @property
    def host_total(self) -> int:
        return self.host_expert_bytes + self.host_reserve_bytes

    @property
    def shared_pool(self) -> bool:
        return self.device == "cpu"

    @property
    def device_free(self) -> int:
        """Bytes left on the device after the plan and its margin (negative: does not fit)."""
        if self.shared_pool:
            return self.host_free
        return self.device_budget - self.device_margin_bytes - self.device_total

    @property
    def host_free(self) -> int:
        used = self.host_total + (self.device_total + self.device_margin_bytes if self.shared_pool else 0)
        return self.host_budget - used

    @property
    def fits(self) -> bool:
        return self.device_free >= 0 and self.host_free >= 0

    def load_kwargs(self) -> dict:
        """Keyword arguments for moe_colab.load_model that realise this plan."""
        return {"experts_on_device": self.experts_on_device, "swap": self.swap,
                "extra_host_rows": self.extra_host_rows, "quant": None if self.scheme == "16-bit" else self.scheme}

    def options(self, **changes):
        """The OffloadOptions that realise this plan (``changes`` for the rest, e.g. prefetch)."""
        from .config import OffloadOptions
        return OffloadOptions.defaults(**{"experts_on_device": self.experts_on_device, "swap": self.swap,
                                          "spare_slots": self.spare_slots,
                                          "extra_host_rows": self.extra_host_rows, **changes})

    def to_dict(self) -> dict:
        return {**asdict(self), "device_total": self.device_total, "host_total": self.host_total,
                "device_free": self.device_free, "host_free": self.host_free, "fits": self.fits}

    # -- display --------------------------------------------------------------------------
    def rows(self) -> list[tuple[str, str, str]]:
        k, L = self.experts_on_device, self.num_layers
        host_rows = self.num_experts - k + 1 if self.swap else self.num_experts
        spare = f" + {self.spare_slots} spare" if self.spare_slots else ""
        extra = f" + {self.extra_host_rows} spare rows" if self.extra_host_rows else ""
        pool = "host (shared)" if self.shared_pool else "device"
        return [
            (f"{pool}: trunk", _gib(self.trunk_bytes), f"{self.scheme}, {self.dtype}"),
            (f"{pool}: expert cache", _gib(self.cache_bytes), f"{L} layers x {k} slots{spare} x {_gib(self.expert_bytes)}"),
            (f"{pool}: KV cache", _gib(self.kv_bytes), f"{self.max_context} tokens, batch 1"),
            (f"{pool}: workspace", _gib(self.workspace_bytes), "activations of one prefill, temporaries"),
            (f"{pool}: margin", _gib(self.device_margin_bytes), "max(256 MiB, 5% of the budget)"),
            ("host: experts" + (" (pinned)" if not self.shared_pool else ""), _gib(self.host_expert_bytes),
             f"{L} layers x {host_rows}{extra} x {_gib(self.expert_bytes)} ({'swap' if self.swap else 'copy'} mode)"
             + (f", {_gib(self.host_expert_bytes - (L * host_rows + self.extra_host_rows) * self.expert_bytes)} of it "
                f"torch's power-of-two rounding"
                if self.host_expert_bytes > (L * host_rows + self.extra_host_rows) * self.expert_bytes else "")),
            ("host: reserve", _gib(self.host_reserve_bytes), "process + loading peak"),
        ]

    def verdict(self) -> str:
        mode = "swap mode (experts on the device need no host copy)" if self.swap else "copy mode"
        return (f"{self.model} at {self.scheme}: {self.experts_on_device} of {self.num_experts} experts per "
                f"layer on {self.device}, {mode}")

    def __str__(self) -> str:
        rows = self.rows()
        w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
        lines = [self.verdict()]
        lines += [f"  {a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
        lines += self._budget_lines()
        return "\n".join(lines)

    __repr__ = __str__

    def _budget_lines(self) -> list[str]:
        if self.shared_pool:
            used = self.host_total + self.device_total + self.device_margin_bytes
            return [f"  host budget {_gib(self.host_budget)}: uses {_gib(used)}, {_gib(self.host_free)} left"]
        return [f"  device budget {_gib(self.device_budget)}: uses {_gib(self.device_total + self.device_margin_bytes)}"
                f" with margin, {_gib(self.device_free)} left",
                f"  host budget {_gib(self.host_budget)}: uses {_gib(self.host_total)}, {_gib(self.host_free)} left"]

    def _repr_markdown_(self) -> str:
        lines = [f"**{self.verdict()}**", "", "| memory | bytes | what |", "|---|---:|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in self.rows()]
        lines += [""] + [l.strip() for l in self._budget_lines()]
        return "\n".join(lines)


def _gib(n: int) -> str:
    """Bytes in GiB, or MiB / KiB for small models (negative: a shortfall)."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size or unit == "KiB":
            return f"{n / size:.2f} {unit}"


# -- what the model is -------------------------------------------------------------------------
def _describe_model(model_or_config, quant):
    """(name, transformers config, QuantConfig | None, exact expert bytes | None, source_is_original)."""
    from transformers import PretrainedConfig

    from .adapters import adapter_for
    from .config import PRESET_HUB_IDS, preset_config, preset_names
    from .quant.config import resolve_quant

    m = model_or_config
    if hasattr(m, "moe_cache"):                                  # a loaded offloaded model
        qcfg = getattr(m.moe_cache.store.format, "qcfg", None) or resolve_quant(quant)
        return type(m).__name__, m.config, qcfg, m.moe_cache.store.nbytes, False
    if not isinstance(m, PretrainedConfig) and isinstance(getattr(m, "config", None), PretrainedConfig):
        m = m.config                                             # a transformers model
    if isinstance(m, PretrainedConfig):                          # a transformers config
        adapter_for(m)                                           # refuses an unsupported family
        return getattr(m, "_name_or_path", "") or "model", m, resolve_quant(quant), None, False
    if not isinstance(m, (str, os.PathLike)):
        raise TypeError(f"plan() takes a model, a config (MixtralConfig, Qwen3MoeConfig, ...), a preset name or "
                        f"a checkpoint path, got {type(m).__name__}")
    name = str(m)
    for alias, preset in (("mixtral-8x7b-instruct", "mixtral-8x7b"),):
        if name == alias:
            name = preset
    if name in preset_names():
        return str(m), preset_config(name), resolve_quant(quant), None, False
    from .checkpoint import builtin_model_path
    path = builtin_model_path(name) or Path(name).expanduser()
    if not path.is_dir() and name in PRESET_HUB_IDS:             # a published model we have a preset of
        return name, preset_config(PRESET_HUB_IDS[name]), resolve_quant(quant), None, False
    if not path.is_dir() and name.count("/") == 1:
        from huggingface_hub import hf_hub_download   # only the small config.json
        path = Path(hf_hub_download(name, "config.json")).parent
    from .convert.manifest import MANIFEST
    if (path / MANIFEST).is_file():                              # our quantized directory
        from .quant.config import QuantConfig
        from .convert.manifest import model_config, read_manifest
        manifest = read_manifest(path)
        qcfg = QuantConfig.from_dict(manifest["scheme"])
        wanted = resolve_quant(quant)
        if wanted is not None and wanted != qcfg:
            raise ValueError(f"{path} holds {qcfg.name!r}, not {wanted.name!r}")
        return path.name, model_config(manifest), qcfg, int(manifest["expert_nbytes"]), False
    if (path / "config.json").is_file():
        cfg_dict = json.loads((path / "config.json").read_text())
        adapter = adapter_for(cfg_dict)                          # refuses an unsupported family
        cfg = adapter.prepare_config(adapter.config_class().from_dict(cfg_dict))
        return path.name, cfg, resolve_quant(quant), None, True
    raise FileNotFoundError(f"plan(): {name!r} is not a preset ({preset_names()}), a checkpoint "
                            f"directory or a Hub id")


def _measure(device_type: str, device_bytes, host_bytes) -> tuple[int, int, bool]:
    """(device budget, host budget, host was measured). CUDA is measured first: initialising it
    grows this process, and the host measurement should see that."""
    if device_type == "cuda" and device_bytes is None:
        device_bytes = torch.cuda.mem_get_info()[0]
    measured = host_bytes is None
    if measured:
        import psutil
        host_bytes = psutil.virtual_memory().available
    if device_type == "cpu":
        return int(host_bytes), int(host_bytes), measured
    return int(device_bytes), int(host_bytes), measured


def _budget_value(name: str, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive, finite number of bytes or None (measure), got {value!r}")
    return int(value)


# -- the plan ----------------------------------------------------------------------------------
def plan(model_or_config, quant=None, device_bytes=None, host_bytes=None, max_context: int = 4096, *,
         device=None, dtype: torch.dtype = torch.float16, experts_on_device: int | None = None,
         min_experts_on_device: int | None = None, swap: bool | None = None,
         pinned_rounding: bool = False) -> Plan:
    """The largest number of experts per layer that fits, and whether swap mode is needed.

    model_or_config: a preset name ("mixtral-8x7b", "qwen3-30b-a3b", "gpt-oss-20b", "olmoe-1b-7b",
        "deepseek-v2-lite", "qwen1.5-moe-a2.7b", "phi-3.5-moe": moe_colab.config.preset_names()),
        a transformers config of a supported family, a checkpoint directory (original or our
        quantized one), a Hub id (config.json only; the presets' ids need no network) or a
        loaded model. An unsupported model_type is refused (ValueError naming the supported ones).
    quant: None (16-bit), a preset ("paper-2bit", "paper-3bit") or a QuantConfig.
    device_bytes / host_bytes: budgets in bytes; None measures this machine (free CUDA memory,
        available host memory). device: "cuda" or "cpu" (default: cuda when device_bytes is
        given or CUDA is available, so a laptop plans for a Colab T4).
    experts_on_device / swap: fix them instead of choosing (the plan still checks they fit).
    min_experts_on_device: the smallest k accepted (default top_k; see the module docstring).
    pinned_rounding: count torch's power-of-two rounding of pinned tensors. The engine pins exact
        sizes (storage.pinned_empty registers ordinary memory with cudaHostRegister), so False;
        True shows what torch's own pinned allocator would cost.
    Raises PlanError, naming the numbers and what to change, when nothing fits.
    """
    if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1:
        raise ValueError(f"max_context must be a positive int, got {max_context!r}")
    # A device budget means an accelerator, on any machine (plan a T4 from a laptop).
    device_type = torch.device(device).type if device is not None else (
        "cuda" if device_bytes is not None or torch.cuda.is_available() else "cpu")
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"unsupported device {device!r}; use 'cuda' or 'cpu'")
    model = _describe_model(model_or_config, quant)
    device_bytes, host_bytes = _budget_value("device_bytes", device_bytes), _budget_value("host_bytes", host_bytes)
    budgets = _measure(device_type, device_bytes, host_bytes)
    args = dict(device_type=device_type, dtype=dtype, max_context=max_context, budgets=budgets,
                pinned_rounding=pinned_rounding)
    choice = dict(experts_on_device=experts_on_device, min_experts_on_device=min_experts_on_device, swap=swap)
    found, closest = _search(model, **args, **choice)
    if found is not None:
        return found
    raise PlanError(_refusal(closest, model, args, choice))


def _search(model, *, device_type, dtype, max_context, budgets, pinned_rounding=False, experts_on_device=None,
            min_experts_on_device=None, swap=None) -> tuple[Plan | None, Plan]:
    """(the plan, None) or (None, the closest miss); allocates nothing."""
    name, config, qcfg, exact_expert, from_original = model
    if qcfg is not None:
        qcfg.validate_for(config)
        if qcfg.is_noop:
            qcfg = None
    dev_budget, host_budget, host_measured = budgets
    from .adapters import adapter_for
    adapter = adapter_for(config)
    # L: MoE layers (the cache's layers); dense layers and shared experts are in the trunk
    E, L, top_k = adapter.num_experts(config), adapter.num_layers(config), adapter.top_k(config)
    eb = exact_expert or expert_bytes(config, qcfg, dtype)
    trunk = trunk_bytes(config, qcfg, dtype)
    # Loading reads the trunk whole (16-bit when quantizing at load time) and one layer's experts.
    source_trunk = trunk_bytes(config, None, dtype) if from_original and qcfg is not None else trunk
    base = Plan(
        model=name, scheme=qcfg.name if qcfg is not None else "16-bit", device=device_type,
        dtype=str(dtype).removeprefix("torch."), num_layers=L, num_experts=E, top_k=top_k,
        max_context=max_context, expert_bytes=eb, experts_on_device=0, swap=False, spare_slots=0,
        extra_host_rows=0, trunk_bytes=trunk,
        cache_bytes=0, kv_bytes=kv_cache_bytes(config, dtype, max_context),
        workspace_bytes=workspace_bytes(config, qcfg, dtype, max_context, device_type),
        device_margin_bytes=max(DEVICE_MARGIN_MIN, int(DEVICE_MARGIN_FRACTION * dev_budget)),
        device_budget=dev_budget, host_expert_bytes=0,
        host_reserve_bytes=(HOST_GROWTH_RESERVE if host_measured else HOST_PROCESS_RESERVE) + source_trunk + E * eb, host_budget=host_budget)

    lowest = top_k if min_experts_on_device is None else min_experts_on_device
    if isinstance(lowest, bool) or not isinstance(lowest, int) or not 1 <= lowest <= E:
        raise ValueError(f"min_experts_on_device={lowest!r} is outside 1..{E}")
    if experts_on_device is not None:
        if isinstance(experts_on_device, bool) or not isinstance(experts_on_device, int) \
                or not 1 <= experts_on_device <= E:
            raise ValueError(f"experts_on_device={experts_on_device!r} is outside 1..{E} "
                             f"(this model has {E} experts per layer)")
        ks = [experts_on_device]
    else:
        ks = list(range(E, lowest - 1, -1))
    modes = [swap] if swap is not None else [False, True]     # copy mode first: swap costs copies
    pinned = device_type == "cuda" and pinned_rounding
    tried = []
    for sw in modes:
        for k in ks:
            rows = E - k + 1 if sw else E
            host = L * (pinned_allocation_bytes(rows * eb) if pinned else rows * eb)
            spare = SPARE_SLOTS if sw else 0
            p = replace(base, experts_on_device=k, swap=sw, spare_slots=spare, cache_bytes=(L * k + spare) * eb,
                        host_expert_bytes=host)
            if p.fits:
                if sw and not pinned:   # what the host budget leaves goes to spare rows (not rounded)
                    extra = min(L * (k - 1), max(0, p.host_free) // eb)
                    p = replace(p, extra_host_rows=extra, host_expert_bytes=host + extra * eb)
                return p, None
            tried.append(p)
    # The closest miss, in the last mode tried: the most slots the device holds (the host then
    # fails; in swap mode more slots only help it), else the fewest slots (the device fails).
    last = [p for p in tried if p.swap == modes[-1]]
    device_ok = [p for p in last if (p.host_free if p.shared_pool else p.device_free) >= 0]
    return None, (device_ok[0] if device_ok else last[-1])


def _refusal(p: Plan, model, args, choice) -> str:
    """The error message: the closest miss in numbers, then what would fit instead."""
    k = p.experts_on_device
    lines = [f"no memory plan fits {p.model} at {p.scheme} ({p.dtype}, {p.max_context}-token context) "
             f"with {k} expert(s) per layer on the device" + (" in swap mode:" if p.swap else ":")]
    if p.shared_pool:
        need = p.device_total + p.device_margin_bytes + p.host_total
        lines.append(f"  host (CPU device, one pool): needs {_gib(need)} = model {_gib(p.device_total)} + margin "
                     f"{_gib(p.device_margin_bytes)} + experts {_gib(p.host_expert_bytes)} + reserve "
                     f"{_gib(p.host_reserve_bytes)}; budget {_gib(p.host_budget)}")
    else:
        if p.device_free < 0:
            lines.append(f"  device: needs {_gib(p.device_total + p.device_margin_bytes)} = trunk "
                         f"{_gib(p.trunk_bytes)} + {k} slot(s) x {p.num_layers} layers {_gib(p.cache_bytes)} + KV "
                         f"{_gib(p.kv_bytes)} + workspace {_gib(p.workspace_bytes)} + margin "
                         f"{_gib(p.device_margin_bytes)}; budget {_gib(p.device_budget)}")
        if p.host_free < 0:
            lines.append(f"  host: needs {_gib(p.host_total)} = experts {_gib(p.host_expert_bytes)} + reserve "
                         f"{_gib(p.host_reserve_bytes)}; budget {_gib(p.host_budget)}")
    lines.append("what would fit instead:")
    suggestions = []
    name, config, qcfg, exact, original = model
    from .quant.config import PRESETS
    if exact is None:                       # a fixed quantized directory cannot change scheme
        seen = set()
        for preset, cfg in PRESETS.items():
            if preset != p.scheme and cfg != qcfg and cfg not in seen:      # aliases once
                seen.add(cfg)
                alt = _try((name, config, cfg, None, original), args, choice)
                if alt:
                    suggestions.append(f"quant={preset!r}: {_short(alt)}")
    if choice["experts_on_device"] is not None:
        if choice["swap"] is False:
            alt = _try(model, args, {**choice, "swap": True})
            if alt:
                suggestions.append(f"swap=True: {_short(alt)} (host memory for about {alt.num_experts - k} of "
                                   f"{alt.num_experts} experts per layer)")
        alt = _try(model, args, {**choice, "experts_on_device": None, "min_experts_on_device": 1, "swap": None})
        if alt:
            suggestions.append(f"experts_on_device={alt.experts_on_device} instead of {k}"
                               + (" (swap mode)" if alt.swap else "") + " -- or experts_on_device='auto', "
                               "which picks it")
    elif k > 1:
        alt = _try(model, args, {**choice, "min_experts_on_device": 1})
        if alt:
            suggestions.append(f"min_experts_on_device=1: {_short(alt)} (fewer than top_k={p.top_k}: every "
                               f"expert use becomes a miss, slow)")
    ctx = p.max_context // 2
    while ctx >= 128:
        alt = _try(model, {**args, "max_context": ctx}, choice)
        if alt:
            suggestions.append(f"max_context={ctx}: {_short(alt)}")
            break
        ctx //= 2
    if not suggestions:
        suggestions.append("nothing at these budgets: use a machine with more memory (a bigger GPU, or more "
                           "host RAM for the offloaded experts)")
    suggestions.append(SCALING_HINT)
    return "\n".join(lines + [f"  - {s}" for s in suggestions])


def _try(model, args, choice) -> Plan | None:
    try:
        return _search(model, **args, **choice)[0]
    except ValueError:
        return None


def _short(p: Plan) -> str:
    return f"{p.experts_on_device} experts per layer" + (" (swap mode)" if p.swap else "")


def _env_bytes(name: str) -> int | None:
    try:
        return parse_bytes(os.environ.get(name))
    except ValueError as e:
        raise ValueError(f"${name}: {e}") from None


def resolve_experts_on_device(config, quant, device, dtype, *, experts_on_device="auto", max_context: int = 4096,
                              device_bytes=None, host_bytes=None, min_experts_on_device=None,
                              swap=None) -> tuple[int, bool, int]:
    """(experts_on_device, swap, extra_host_rows) for load_model; raises PlanError before anything
    is allocated.

    experts_on_device: "auto" plans it; an int is checked against the budgets (swap chosen if
    needed). Budgets: the arguments, else $MOE_COLAB_DEVICE_BYTES / $MOE_COLAB_HOST_BYTES
    (e.g. "15GiB", to rehearse a T4 on a bigger machine), else measured.
    """
    if experts_on_device != "auto" and (isinstance(experts_on_device, bool) or not isinstance(experts_on_device, int)):
        raise TypeError(f"experts_on_device must be an int or 'auto', got {experts_on_device!r}")
    device_bytes = device_bytes if device_bytes is not None else _env_bytes("MOE_COLAB_DEVICE_BYTES")
    host_bytes = host_bytes if host_bytes is not None else _env_bytes("MOE_COLAB_HOST_BYTES")
    p = plan(config, quant, device_bytes, host_bytes, max_context, device=device, dtype=dtype,
             experts_on_device=None if experts_on_device == "auto" else experts_on_device,
             min_experts_on_device=min_experts_on_device, swap=swap)
    return p.experts_on_device, p.swap, p.extra_host_rows
