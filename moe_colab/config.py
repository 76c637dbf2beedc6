"""Named presets: model shapes and offloading settings.

A preset is plain data (like nanoGPT's GPTConfig), so notebooks, the planner and the benchmark
can build a config without touching any weights. Quantization presets live in
``moe_colab.quant.config``.

References: Mixtral-8x7B shapes from arXiv 2401.04088 and ../shared/reference/paper.md.
"""
from __future__ import annotations

from dataclasses import dataclass

# Keyword arguments for transformers.MixtralConfig.
MODEL_PRESETS: dict[str, dict] = {
    # Mixtral-8x7B(-Instruct): 46.7B parameters, 45.1B of them in experts.
    "mixtral-8x7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_theta=1e6, tie_word_embeddings=False,
    ),
    # The built-in model moe_colab/tiny/weights (moe_colab/tiny/train.py): 9.1M parameters, trained on the stdlib.
    "tiny": dict(
        vocab_size=4096, hidden_size=192, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=1e4, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    ),
    # A few-layer random model for unit tests: every code path, milliseconds per token.
    "debug": dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=False,
    ),
}

# Hub ids the loader accepts by short name.
HUB_ALIASES: dict[str, str] = {
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "mixtral-8x7b-instruct": "mistralai/Mixtral-8x7B-Instruct-v0.1",
}


def mixtral_config(name: str, **overrides):
    """A transformers.MixtralConfig for a named preset (``"mixtral-8x7b"``, ``"debug"``)."""
    from transformers import MixtralConfig

    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return MixtralConfig(**{**MODEL_PRESETS[name], **overrides})


@dataclass(frozen=True)
class OffloadConfig:
    """How many experts of each layer live on the compute device, and how many to guess ahead."""

    experts_on_device: int = 4   # LRU slots per layer (the paper: 4 of 8 on a T4, 2 on 12 GB)
    prefetch: int = 2            # experts of layer l+1 loaded speculatively while layer l runs
    guess_from: str = "auto"     # which hidden state feeds the next router: see prefetch.py

    def validate(self, num_experts: int) -> None:
        _check_count("experts_on_device", self.experts_on_device, 1, num_experts)
        _check_count("prefetch", self.prefetch, 0, num_experts)
        if self.guess_from not in ("auto", "before", "after"):
            raise ValueError(f"guess_from must be 'auto', 'before' or 'after', got {self.guess_from!r}")


def _check_count(name: str, value, lowest: int, num_experts: int) -> None:
    """An int in lowest..num_experts, else TypeError / ValueError naming the model's expert count."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not lowest <= value <= num_experts:
        raise ValueError(f"{name}={value} is outside {lowest}..{num_experts} "
                         f"(this model has {num_experts} experts per layer)")
