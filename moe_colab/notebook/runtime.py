"""Where is this notebook running? The checks behind every notebook's setup cells.

A notebook calls ``check_runtime(USE_REAL_MIXTRAL)`` once. It prints what the reader needs to
know (Colab or not, which device, which model the notebook will use and why) and returns a
``Runtime`` the rest of the notebook reads its choices from:

    USE_REAL_MIXTRAL = False   ->  the shipped ``tiny`` model, on CPU, float32 (minutes, offline)
    USE_REAL_MIXTRAL = True    ->  Mixtral-8x7B-Instruct in float16 if a CUDA GPU is present;
                                   without one the notebook says so and falls back to ``tiny``

On Colab without a GPU it names the exact menu path that switches the runtime to a T4.
``MOE_COLAB_MODEL=/path/to/checkpoint`` replaces ``tiny`` (e.g. to run the notebooks in CI
against a checkpoint written by a test); ``MOE_COLAB_MIXTRAL=/path`` points the real-model path
at an already quantized Mixtral (``moe_colab.convert.hub.quantize_from_hub`` writes one, e.g. on Google
Drive) instead of quantizing the Hub checkpoint at load time.
Colab also needs one call before third-party widgets (plotly's FigureWidget) can render:
``enable_colab_widgets()``, a no-op elsewhere.
"""
from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass

COLAB_GPU_MENU = "Runtime → Change runtime type → Hardware accelerator → T4 GPU"
REAL_MODEL = "mixtral-8x7b-instruct"   # a HUB_ALIASES name in moe_colab.config
OFFLINE_MODEL = "tiny"                 # shipped inside the package (moe_colab/tiny/weights)


def in_colab() -> bool:
    return "google.colab" in sys.modules


def in_kernel() -> bool:
    """True inside a Jupyter/Colab kernel (a frontend *may* be attached); False in plain Python."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def widgets_available() -> bool:
    """Can this process build live widgets? Needs a kernel, ipywidgets and anywidget (plotly >= 6
    builds FigureWidget on anywidget). ``MOE_COLAB_STATIC=1`` forces static figures."""
    if os.environ.get("MOE_COLAB_STATIC", "") not in ("", "0"):
        return False
    if not in_kernel():
        return False
    try:
        import anywidget  # noqa: F401
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def enable_colab_widgets() -> bool:
    """Turn on Colab's custom widget manager (third-party widgets render only after it).
    Returns True if it was enabled, False when not on Colab."""
    if not in_colab():
        return False
    from google.colab import output  # only importable on Colab
    output.enable_custom_widget_manager()
    return True


@dataclass(frozen=True)
class Runtime:
    colab: bool
    device: str          # "cuda" or "cpu"
    gpu_name: str | None
    gpu_memory_gb: float | None
    model: str           # what to pass to moe_colab.load_model / record_routing's loader
    dtype_name: str      # "float16" on a GPU, "float32" on CPU
    real_mixtral: bool   # True only when the real Mixtral was asked for AND a GPU is present

    @property
    def dtype(self):
        import torch
        return getattr(torch, self.dtype_name)

    def load_kwargs(self, **overrides) -> dict:
        """Keyword arguments for ``moe_colab.load_model(rt.model, ...)`` on this machine. The real
        Mixtral is quantized as in the paper's Colab demo (4-bit attention, 2-bit experts): in
        16-bit it would need 87 GB of host memory, a Colab T4 machine has about 12.7 GB."""
        kw = dict(device=self.device, dtype=self.dtype, experts_on_device=4, prefetch=2, progress=False)
        if self.real_mixtral and self.model == REAL_MODEL:    # the Hub checkpoint: quantize it
            kw["quant"] = "paper-2bit"
        return {**kw, **overrides}


def check_runtime(use_real_mixtral: bool = False, *, verbose: bool = True) -> Runtime:
    """Inspect the machine, choose the model, and (by default) print a short report."""
    import torch

    cuda = torch.cuda.is_available()
    gpu_name = torch.cuda.get_device_name(0) if cuda else None
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None
    real = bool(use_real_mixtral) and cuda
    rt = Runtime(
        colab=in_colab(), device="cuda" if cuda else "cpu", gpu_name=gpu_name, gpu_memory_gb=gpu_gb,
        model=(os.environ.get("MOE_COLAB_MIXTRAL") or REAL_MODEL) if real
        else os.environ.get("MOE_COLAB_MODEL") or OFFLINE_MODEL,
        dtype_name="float16" if cuda else "float32", real_mixtral=real)
    if verbose:
        print(describe(rt, asked_for_real=bool(use_real_mixtral)))
    return rt


def describe(rt: Runtime, asked_for_real: bool = False) -> str:
    import torch

    where = "Google Colab" if rt.colab else f"{platform.system()} (not Colab)"
    lines = [f"running on: {where}, Python {platform.python_version()}, torch {torch.__version__}"]
    if rt.device == "cuda":
        lines.append(f"device: cuda ({rt.gpu_name}, {rt.gpu_memory_gb:.1f} GiB)")
    else:
        lines.append("device: cpu (no CUDA GPU visible)")
    if rt.colab and rt.device == "cpu":
        lines.append(f"This Colab runtime has no GPU. To get a free T4: {COLAB_GPU_MENU}, "
                     "then run the notebook again from the top.")
    if asked_for_real and not rt.real_mixtral:
        lines.append("USE_REAL_MIXTRAL is True but there is no GPU: using the small 'tiny' model instead.")
    lines.append(f"model: {rt.model} ({rt.dtype_name} on {rt.device})")
    return "\n".join(lines)
