"""Where is this notebook running, and which model does it use? The checks and loads behind
every notebook's setup cells.

A notebook calls ``check_runtime(USE_REAL_MIXTRAL)`` once. It prints what the reader needs to
know (Colab or not, which device, which model the notebook will use and why) and returns a
``Runtime`` the rest of the notebook reads its choices from:

    USE_REAL_MIXTRAL = False   ->  the shipped ``tiny`` model, on CPU, float32 (seconds, offline)
    USE_REAL_MIXTRAL = True    ->  Mixtral-8x7B-Instruct in float16 if a CUDA GPU is present;
                                   without one the notebook says so and falls back to ``tiny``

Every notebook loads its model ONCE, through ``rt.load_model(...)``, and its tokenizer through
``rt.tokenizer()``. For the real model both read one shared pre-quantized directory
(``real_weights()``), made once per machine and reused by every notebook:

    source "authors" (default)  the paper authors' published 2-bit checkpoint
                                (lavawolfiee/Mixtral-8x7B-Instruct-v0.1-offloading-demo: public,
                                no token; 257 files, about 18 GB), converted file by file into our
                                format (moe_colab.convert.authors) on Colab's local disk
    source "mistral"            quantize-your-own from the gated mistralai repository (a Hugging
                                Face token; 19 shards, about 93 GB, one shard on disk at a time;
                                moe_colab.convert.hub.quantize_from_hub)

and the model is loaded with ``experts_on_device="auto"``: the planner picks the experts per
layer and swap mode for this machine (5 of 8, swap, on a free T4) or refuses before allocating.
The tokenizer downloads tokenizer files only (about 2 MB, from the mistralai repository: the
authors' repository has none; that repository is gated, so this step needs the token too).

On Colab without a GPU it names the exact menu path that switches the runtime to a T4.
``MOE_COLAB_MODEL=/path/to/checkpoint`` replaces ``tiny`` (e.g. to run the notebooks in CI
against a checkpoint written by a test); ``MOE_COLAB_MIXTRAL=/path`` points the real-model path
at an already quantized Mixtral directory instead of ``real_weights()``'s default place.
Colab also needs one call before third-party widgets can render: ``enable_colab_widgets()``,
a no-op elsewhere.
"""
from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass

COLAB_GPU_MENU = "Runtime → Change runtime type → Hardware accelerator → T4 GPU"
REAL_MODEL = "mixtral-8x7b-instruct"   # a HUB_ALIASES name in moe_colab.config
OFFLINE_MODEL = "tiny"                 # shipped inside the package (moe_colab/tiny/weights)
AUTHORS_REPO = "lavawolfiee/Mixtral-8x7B-Instruct-v0.1-offloading-demo"   # public, no token
MISTRAL_REPO = "mistralai/Mixtral-8x7B-Instruct-v0.1"                     # gated: a token
REAL_QUANT = "paper-2bit"            # 4-bit attention, 2-bit experts: the paper's Colab scheme
# What the tokenizer needs, nothing more (the repository also holds ~93 GB of weights).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")
# Sizes from the Hub's file pages, for the notebooks' "what you need": the authors' 257 files
# (256 experts of 66.4 MB and the trunk), the mistralai checkpoint's 19 shards.
DOWNLOAD_GB = {"authors": 18, "mistral": 93}


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
        """Keyword arguments for ``moe_colab.load_model`` on this machine. ``tiny``: 4 of its 8
        experts per layer, 2 prefetched. The real Mixtral: ``experts_on_device="auto"``, so the
        planner picks the count and swap mode for this GPU and host (a fixed count could ask for
        more host memory than a free Colab has; the planner refuses that before allocating)."""
        kw = dict(device=self.device, dtype=self.dtype, experts_on_device=4, prefetch=2, progress=False)
        if self.real_mixtral:
            kw.update(experts_on_device="auto", progress=True)
        return {**kw, **overrides}

    def load_model(self, source: str = "authors", **overrides):
        """The notebook's one model: ``tiny`` (or ``MOE_COLAB_MODEL``), or the real Mixtral from
        the shared pre-quantized directory (``real_weights(source)``), planned for this machine.
        ``overrides`` go to ``moe_colab.load_model`` (e.g. ``prefetch=0``, ``events=EventLog()``);
        for the real model an ``experts_on_device`` override is checked by the planner too."""
        import moe_colab
        kw = self.load_kwargs(**overrides)
        if self.real_mixtral:
            return moe_colab.load_model(real_weights(source), **kw)
        return moe_colab.load_model(self.model, **kw)

    def tokenizer(self, source: str = "authors"):
        """The model's tokenizer; for the real model, tokenizer files only (never the weights)."""
        from transformers import AutoTokenizer
        if self.real_mixtral:
            return AutoTokenizer.from_pretrained(real_tokenizer_dir(real_weights(source, download=False)))
        from ..checkpoint import resolve
        return AutoTokenizer.from_pretrained(resolve(self.model))


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
    if rt.colab and rt.device == "cpu" and asked_for_real:
        lines.append(f"This Colab runtime has no GPU. To get a free T4: {COLAB_GPU_MENU}, "
                     "then run the notebook again from the top.")
    elif rt.device == "cpu" and not asked_for_real:
        lines.append("a CPU is all this notebook needs with the small model")
    if asked_for_real and not rt.real_mixtral:
        lines.append("USE_REAL_MIXTRAL is True but there is no GPU: using the small 'tiny' model instead.")
    lines.append(f"model: {rt.model} ({rt.dtype_name} on {rt.device})")
    return "\n".join(lines)


# -- the real model's weights and tokenizer ----------------------------------------------------
def real_weights_dir(source: str = "authors"):
    """Where the shared pre-quantized Mixtral lives: ``$MOE_COLAB_MIXTRAL``, else Colab's local
    disk (/content: about 100 GB free, no Drive needed), else ~/.cache/moe_colab."""
    from pathlib import Path
    if source not in DOWNLOAD_GB:
        raise ValueError(f"source must be one of {sorted(DOWNLOAD_GB)}, got {source!r}")
    if os.environ.get("MOE_COLAB_MIXTRAL"):
        return Path(os.environ["MOE_COLAB_MIXTRAL"])
    root = Path("/content") if in_colab() else Path.home() / ".cache"
    return root / "moe_colab" / f"mixtral-8x7b-instruct-{REAL_QUANT}-{source}"


def is_complete(directory) -> bool:
    """A finished quantized directory (its manifest says complete): nothing to download."""
    import json
    from pathlib import Path
    from ..convert.manifest import MANIFEST
    f = Path(directory) / MANIFEST
    try:
        return f.is_file() and bool(json.loads(f.read_text()).get("complete"))
    except ValueError:
        return False


def real_weights(source: str = "authors", *, download: bool = True, token=None, scratch=None):
    """The shared pre-quantized Mixtral-8x7B-Instruct directory, made on first use:

    "authors"  the paper authors' checkpoint (AUTHORS_REPO: public, no token, ~18 GB in 257
               files), each file downloaded, dequantized, quantized again into our paper-2bit
               format and deleted before the next (disk: the result, ~18 GiB, plus one file)
    "mistral"  the original checkpoint (MISTRAL_REPO: gated, needs a token, ~93 GB in 19 shards
               of ~4.9 GB), quantized shard by shard (disk: the result plus one shard)

    Both resume where they stopped if the runtime disconnects. Later calls (and every other
    notebook) find the finished directory and download nothing."""
    dst = real_weights_dir(source)
    if is_complete(dst) or not download:
        return dst
    import tempfile
    scratch = scratch or tempfile.mkdtemp(prefix="moe_colab_download_")
    if source == "authors":
        from ..convert.authors import convert_authors_checkpoint
        return convert_authors_checkpoint(dst, AUTHORS_REPO, REAL_QUANT, scratch=scratch)
    from ..convert.hub import hub_fetcher, quantize_from_hub
    return quantize_from_hub(MISTRAL_REPO, dst, REAL_QUANT, scratch=scratch,
                             fetch=hub_fetcher(MISTRAL_REPO, scratch, token=token))


def real_tokenizer_dir(weights_dir=None, *, token=None):
    """A directory with the tokenizer's files: the weights directory if they are there (the
    "mistral" path copies them), else only TOKENIZER_FILES from MISTRAL_REPO (~2 MB; gated: a
    token from ``huggingface-cli login``, Colab's secret HF_TOKEN, or ``token``)."""
    from pathlib import Path
    if weights_dir is not None and (Path(weights_dir) / "tokenizer_config.json").is_file():
        return Path(weights_dir)
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(MISTRAL_REPO, allow_patterns=list(TOKENIZER_FILES), token=token))
