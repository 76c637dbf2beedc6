"""Which parts of the model are quantized, and how: ``QuantConfig`` and the paper's presets.

Mixed quantization (arXiv 2312.17238, section 3.3): the attention projections (q, k, v, o) and
the experts get separate bit widths; embeddings, lm_head, routers and norms always stay 16-bit.
Each bit width has the paper's HQQ group size and "scale group" (how many consecutive scales or
zeros share one 8-bit meta-quantization):

    bits   group   scale group   ~bits per weight (codes + 8-bit scale and zero + fp16 meta)
     4       64       256          4.25
     3       64       128          3.26
     2       16       128          3.03
    16        -        -          16 (not quantized)

    QuantConfig(attn_bits=4, expert_bits=2)      == resolve_quant("paper-2bit")
    QuantConfig(4, 3)                            == resolve_quant("paper-3bit") == resolve_quant("attn4-exp3")
    QuantConfig(4, 4)                            == resolve_quant("attn4-exp4")
    QuantConfig(16, 2, expert_group_size=32)     any pair in {16, 4, 3, 2}, any dividing group
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

SUPPORTED_BITS = (16, 4, 3, 2)
# bits -> (group_size, scale_group), the paper's HQQ settings
PAPER_GROUPS = {4: (64, 256), 3: (64, 128), 2: (16, 128)}


@dataclass(frozen=True)
class QuantConfig:
    attn_bits: int = 16
    expert_bits: int = 16
    attn_group_size: int | None = None      # None: the paper's group for attn_bits
    attn_scale_group: int | None = None
    expert_group_size: int | None = None
    expert_scale_group: int | None = None

    def __post_init__(self):
        for part in ("attn", "expert"):
            bits = getattr(self, f"{part}_bits")
            if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
                raise ValueError(f"unsupported bit width {part}_bits={bits!r}; choose one of {SUPPORTED_BITS}")
            for field, default in zip(("group_size", "scale_group"), PAPER_GROUPS.get(bits, (None, None))):
                name = f"{part}_{field}"
                value = getattr(self, name)
                if bits == 16:  # not quantized: no groups (also after dataclasses.replace)
                    object.__setattr__(self, name, None)
                    continue
                if value is None:
                    object.__setattr__(self, name, default)
                elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"unsupported {name.replace('_', ' ')} {value!r}: must be a positive int")

    # -- what each part uses ------------------------------------------------------------------
    def matrix(self, part: str) -> tuple[int, int | None, int | None]:
        """(bits, group_size, scale_group) for part "attn" or "expert"."""
        if part not in ("attn", "expert"):
            raise ValueError(f"part must be 'attn' or 'expert', got {part!r}")
        return (getattr(self, f"{part}_bits"), getattr(self, f"{part}_group_size"),
                getattr(self, f"{part}_scale_group"))

    @property
    def is_noop(self) -> bool:
        """True for 16-bit attention and experts (nothing quantized)."""
        return self.attn_bits == 16 and self.expert_bits == 16

    @property
    def name(self) -> str:
        """Short name: a preset's name if it is one, else e.g. "attn4g64s256-exp2g16s128"."""
        for preset, cfg in PRESETS.items():
            if cfg == self:
                return preset
        parts = []
        for part, label in (("attn", "attn"), ("expert", "exp")):
            bits, g, sg = self.matrix(part)
            parts.append(f"{label}16" if bits == 16 else f"{label}{bits}g{g}s{sg}")
        return "-".join(parts)

    def describe(self) -> str:
        def one(part):
            bits, g, sg = self.matrix(part)
            return "16-bit" if bits == 16 else f"{bits}-bit (group {g}, scale group {sg})"
        return f"attention {one('attn')}, experts {one('expert')}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {sorted(unknown)}")
        return cls(**d)

    # -- checks against a model ------------------------------------------------------------
    def validate_for(self, config) -> None:
        """Raise ValueError if a group size does not divide an input dimension of ``config``."""
        from ..adapters import adapter_for
        inputs = adapter_for(config).quant_inputs(config)       # the family's matrices' input widths
        for part, dims in inputs.items():
            bits, g, _ = self.matrix(part)
            if bits == 16:
                continue
            for what, dim in dims.items():
                if dim % g:
                    raise ValueError(f"{part}_group_size={g} does not divide the input dimension {dim} of "
                                     f"{what}; choose a group size that divides it")
                if dim % 8:
                    raise ValueError(f"the input dimension {dim} of {what} is not a multiple of 8, which "
                                     f"the {bits}-bit packing needs; keep {part}_bits=16 for this model")


PRESETS: dict[str, QuantConfig] = {
    "paper-2bit": QuantConfig(attn_bits=4, expert_bits=2),   # the paper's Colab demo
    "paper-3bit": QuantConfig(attn_bits=4, expert_bits=3),
    # named for what they are (any family); the first two are the paper's presets again, and a
    # QuantConfig's .name stays the paper's name for them
    "attn4-exp2": QuantConfig(attn_bits=4, expert_bits=2),
    "attn4-exp3": QuantConfig(attn_bits=4, expert_bits=3),
    "attn4-exp4": QuantConfig(attn_bits=4, expert_bits=4),   # Qwen3-30B-A3B / gpt-oss-20b on a T4
    "attn16-exp4": QuantConfig(attn_bits=16, expert_bits=4),
}


_NAME = re.compile(r"^attn(\d+)(?:g(\d+)s(\d+))?-exp(\d+)(?:g(\d+)s(\d+))?$")


def resolve_quant(quant) -> QuantConfig | None:
    """None, a preset name ("paper-2bit", "paper-3bit") or a QuantConfig -> QuantConfig | None."""
    if quant is None or isinstance(quant, QuantConfig):
        return quant
    if isinstance(quant, str):
        key = quant.strip().lower()
        if key in ("none", "fp16", "16", "16bit", "16-bit"):
            return None
        if key in PRESETS:
            return PRESETS[key]
        m = _NAME.match(key)
        if m:              # a QuantConfig's own .name ("attn4g16s256-exp4g16s256", "attn16-exp2g16s128")
            groups = [int(v) if v else None for v in m.groups()]
            return QuantConfig(groups[0], groups[3], groups[1], groups[2], groups[4], groups[5])
        raise ValueError(f"unknown quantization preset {quant!r}; choose one of {sorted(PRESETS)}, "
                         f"None, or pass moe_colab.QuantConfig(attn_bits, expert_bits)")
    raise TypeError(f"quant must be None, a preset name or a QuantConfig, got {type(quant).__name__}")
