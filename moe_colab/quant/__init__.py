"""Mixed HQQ quantization: attention and experts quantized separately, the rest kept 16-bit.

    packing.py    the low-bit matrix format in plain torch (bit packing, 8-bit meta-quantized
                  scales and zeros, dequantization, the reference linear)
    matrix.py     one matrix through hqq's Quantizer (axis=1) + meta-quantization
    config.py     QuantConfig, the paper's presets, resolve_quant
    format.py     QuantizedExpertFormat (one buffer per expert), QuantLinear, quantize_trunk_
    quantize.py   quantize a checkpoint once, resumably; manifest.py reads it back
    size.py       estimate_size (Table 1's size column)
    experts.py    a whole model quantized in memory (QuantizedExperts, quantize_model_)
    perplexity.py perplexity and the 16-pair (attention, experts) table
    kernels.py    fused Triton dequant + matmul (written against the same format)

Reference: Eliseev & Mazur, arXiv 2312.17238, section 3.3 and Table 1.
"""
from __future__ import annotations

import importlib

# Lazy, so that `import moe_colab.quant.packing` stays light. `quantize` is deliberately not
# listed: moe_colab.convert.quantize is the module (use moe_colab.quantize for the function).
_PUBLIC = {
    "QuantConfig": "moe_colab.quant.config",
    "resolve_quant": "moe_colab.quant.config",
    "PRESETS": "moe_colab.quant.config",
    "estimate_size": "moe_colab.quant.size",
    "QuantizedExpertFormat": "moe_colab.quant.format",
    "QuantLinear": "moe_colab.quant.format",
    "quantize_trunk_": "moe_colab.quant.format",
    "open_quantized": "moe_colab.convert.manifest",
    "is_quantized_dir": "moe_colab.convert.manifest",
    "quantize_model_": "moe_colab.quant.experts",
    "perplexity": "moe_colab.quant.perplexity",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'moe_colab.quant' has no attribute {name!r}")
