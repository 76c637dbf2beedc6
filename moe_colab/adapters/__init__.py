"""Adapters: everything one MoE family's checkpoints and modules make specific.

The cache, storage and MoE block never name a model family; they ask an adapter. To add a
family (Qwen-MoE, OLMoE, DeepSeek, GPT-OSS), write a module like ``mixtral.py`` and register it
in ``ADAPTERS`` below.
"""
from __future__ import annotations

from .mixtral import MixtralAdapter

ADAPTERS = {cls.model_type: cls for cls in (MixtralAdapter,)}


def adapter_for(config_or_type) -> "MixtralAdapter":
    """The adapter for a config (or a ``model_type`` string); a clear error if none fits."""
    model_type = config_or_type if isinstance(config_or_type, str) else getattr(config_or_type, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"config is not a supported MoE model: model_type={model_type!r}; "
            f"supported: {sorted(ADAPTERS)}")
    return ADAPTERS[model_type]()
