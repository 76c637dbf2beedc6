"""moe_colab: run Mixtral-8x7B on a free Colab T4 by offloading experts, and learn why it works.

Public names (imported lazily, so ``import moe_colab`` stays fast and pulls no plotly):

    load_model, model_path       moe_colab.model
    OffloadOptions               moe_colab.config (every engine setting, one frozen object)
    quantize                     moe_colab.convert.quantize
    QuantConfig                  moe_colab.quant.config
    estimate_size                moe_colab.quant.size
    plan                         moe_colab.planner
    RoutingTrace, record_routing moe_colab.analysis.routing
    simulate_cache               moe_colab.analysis.simulate

The rooms (subpackages, also reachable as attributes: ``moe_colab.engine``, ...):

    engine/    the paper's idea: storage, cache, prefetch, moe_block, graphs, build_engine
    quant/     the low-bit format: HQQ via hqq, packing, Triton kernels
    convert/   writing and reading quantized directories (local, Hub, the authors' layout)
    analysis/  routing traces, locality, cache and prefetch simulation
    notebook/  widgets and runtime checks for the notebooks
    bench/     the GPU benchmark
    tiny/      the built-in model: its trainer, data, card and weights
    adapters/  one module per MoE family

Reference: Eliseev & Mazur, "Fast Inference of Mixture-of-Experts Language Models with
Offloading", arXiv 2312.17238.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "load_model": "moe_colab.model",
    "model_path": "moe_colab.model",
    "OffloadOptions": "moe_colab.config",
    "quantize": "moe_colab.convert.quantize",
    "QuantConfig": "moe_colab.quant.config",
    "estimate_size": "moe_colab.quant.size",
    "plan": "moe_colab.planner",
    "RoutingTrace": "moe_colab.analysis.routing",
    "record_routing": "moe_colab.analysis.routing",
    "simulate_cache": "moe_colab.analysis.simulate",
}

__all__ = sorted(_PUBLIC)

_SUBMODULES = ("engine", "quant", "convert", "analysis", "notebook", "bench", "tiny", "adapters",
               "config", "planner", "memory", "checkpoint", "model")


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"moe_colab.{name}")
    raise AttributeError(f"module 'moe_colab' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_PUBLIC) + list(_SUBMODULES))
