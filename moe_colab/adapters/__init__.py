"""Adapters: everything one MoE family's checkpoints and modules make specific.

The cache, storage, MoE block, loader, writer and planner never name a model family; they ask an
adapter (base.py: MoEAdapter, the hooks and their defaults). To add a family, write a module like
``qwen_moe.py``, register it in ``ADAPTERS`` below, and follow docs/adapters.md.
"""
from __future__ import annotations

from .base import ExpertReader, MoEAdapter
from .deepseek import DeepseekV2Adapter, DeepseekV3Adapter
from .gpt_oss import GptOssAdapter
from .mixtral import MixtralAdapter
from .olmoe import OlmoeAdapter
from .phimoe import PhimoeAdapter
from .qwen_moe import Qwen2MoeAdapter, Qwen3MoeAdapter

ADAPTERS: dict[str, type[MoEAdapter]] = {cls.model_type: cls for cls in (
    MixtralAdapter, Qwen3MoeAdapter, Qwen2MoeAdapter, OlmoeAdapter, PhimoeAdapter, DeepseekV2Adapter,
    DeepseekV3Adapter, GptOssAdapter)}


class UnsupportedModelError(ValueError):
    """A config whose model_type has no adapter (a ValueError, as before)."""


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(config_or_type) -> MoEAdapter:
    """The adapter for a config, a config dict or a ``model_type`` string; a clear error if none fits."""
    if isinstance(config_or_type, str):
        model_type = config_or_type
    elif isinstance(config_or_type, dict):
        model_type = config_or_type.get("model_type")
    else:
        model_type = getattr(config_or_type, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"config is not a supported MoE model: model_type={model_type!r}; supported: "
            f"{', '.join(supported_model_types())}. Adding a family is one adapter module: see docs/adapters.md")
    return ADAPTERS[model_type]()
