"""The committed notebooks are clean, built from their sources, and share one skeleton.

Clean: no outputs, no execution counts, no widget state (a notebook saved from a live session
carries all three, and they make diffs unreadable and leak state). Skeleton: the Colab badge of
the notebook itself, a title, objectives, what you need, the USE_REAL_MIXTRAL flag, the
Colab-only install cell that never installs torch, the runtime check, summary, exercises and
what's next, a relative link beside every badge of another notebook (JupyterLab and Binder readers
stay where they are), a figure per idea, a hint and a solution per exercise; Colab metadata asking
for a T4 only where the notebook needs one. Executing them is nbval's job (`make test`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

from tools import nbbuild as _nbtools
from moe_colab.notebook.runtime import COLAB_GPU_MENU, Runtime, describe

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
EXPECTED = ["00_index", "01_router_analysis", "02_expert_locality", "03_lru_cache", "04_speculative_loading",
            "05_mixed_quantization", "05b_quantized_model", "06_mixtral_on_a_t4", "07_inside_the_engine"]
# Notebooks that need a GPU for their point (Colab opens them on a T4); the others open on a CPU
# runtime and say how to switch when USE_REAL_MIXTRAL is set.
GPU_NOTEBOOKS = {"06_mixtral_on_a_t4"}
HEADINGS = [r"^# \S", r"^## Objectives", r"^## What you need", r"^## 0\. Setup", r"^## Summary",
            r"^## Exercises", r"^## What's next"]


def load(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def test_expected_notebooks_exist():
    names = [p.stem for p in PATHS]
    assert set(EXPECTED) <= set(names), f"notebooks/ holds {names}"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_notebook_is_clean(path):
    raw = json.loads(path.read_text())
    nbformat.validate(nbformat.from_dict(raw))
    assert "widgets" not in raw["metadata"], f"{path.name}: metadata.widgets holds saved widget state"
    for i, cell in enumerate(raw["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name} cell {i} has outputs"
            assert cell["execution_count"] is None, f"{path.name} cell {i} has an execution_count"
        assert "execution" not in cell.get("metadata", {}), f"{path.name} cell {i} has timing metadata"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_notebook_skeleton(path):
    nb = load(path)
    if path.stem in GPU_NOTEBOOKS:
        assert nb.metadata.get("colab", {}).get("gpuType") == "T4", f"{path.name}: colab.gpuType is not T4"
        assert nb.metadata.get("accelerator") == "GPU", f"{path.name}: accelerator is not GPU"
    elif path.stem in EXPECTED:
        assert "accelerator" not in nb.metadata and "gpuType" not in nb.metadata.get("colab", {}), \
            f"{path.name}: asks Colab for a GPU although it runs on a CPU"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and _nbtools.colab_url(path.stem) in first.source, \
        f"{path.name}: the first cell lacks this notebook's own Colab badge"

    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    positions = []
    for pattern in HEADINGS:
        m = re.search(pattern, markdown, flags=re.M)
        assert m, f"{path.name}: no heading matching {pattern!r}"
        positions.append(m.start())
    assert positions == sorted(positions), f"{path.name}: skeleton headings out of order"

    code = [c.source for c in nb.cells if c.cell_type == "code"]
    flag = [i for i, s in enumerate(code) if re.search(r"^USE_REAL_MIXTRAL = False\b", s, flags=re.M)]
    install = [i for i, s in enumerate(code) if "pip install" in s]
    runtime = [i for i, s in enumerate(code) if "check_runtime(USE_REAL_MIXTRAL)" in s]
    assert flag and install and runtime, f"{path.name}: flag/install/runtime cells missing"
    assert flag[0] < install[0] < runtime[0] == install[0] + 1, f"{path.name}: setup cells out of order"
    assert len(install) == 1, f"{path.name}: pip install appears in more than one cell"
    src = code[install[0]]
    guarded = re.search(r'^if "google\.colab" in sys\.modules:\n((?:    .*\n?)+)', src, flags=re.M)
    assert guarded and "pip install" in guarded.group(1), f"{path.name}: the install is not Colab-only"
    pip_line = next(l for l in src.splitlines() if "pip install" in l)
    assert not re.search(r"\btorch\b", pip_line), f"{path.name}: the install cell would reinstall torch"
    assert "enable_custom_widget_manager()" in guarded.group(1), f"{path.name}: Colab widgets not enabled"


@pytest.mark.parametrize("path", [p for p in PATHS if p.stem in EXPECTED], ids=lambda p: p.stem)
def test_links_figures_and_solutions(path):
    """Every badge of another notebook has a relative link beside it; every notebook shows a
    committed diagram; every exercise has a hint and a solution."""
    nb = load(path)
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for m in re.finditer(r"\(https://colab\.research\.google\.com/github/[^)]*/notebooks/(\w+)\.ipynb\)", markdown):
        if m.group(1) != path.stem:
            assert f"]({m.group(1)}.ipynb)" in markdown, f"{path.name}: no relative link beside the badge of {m.group(1)}"
    figures = re.findall(r"\]\((figures/[\w.-]+\.svg)\)", markdown)
    assert figures, f"{path.name}: no diagram from notebooks/figures"
    for f in figures:
        assert (NOTEBOOKS / f).is_file(), f"{path.name}: {f} does not exist"
    exercises = markdown.split("## Exercises", 1)[1].split("## What's next", 1)[0]
    numbered = re.findall(r"^(\d+)\. ", exercises, flags=re.M)
    assert numbered, f"{path.name}: no numbered exercise"
    for n in numbered:
        assert re.search(rf"<summary>Hint {n}</summary>", exercises), f"{path.name}: exercise {n} has no hint"
        assert re.search(rf"<summary>Solution {n}</summary>", exercises), f"{path.name}: exercise {n} has no solution"


def test_notebooks_match_their_sources():
    assert _nbtools.main(["--check", "--dir", str(NOTEBOOKS)]) == 0, "run: python -m tools.nbbuild"
    assert sorted(p.stem for p in _nbtools.sources(NOTEBOOKS)) == [p.stem for p in PATHS]


def test_figures_match_their_code():
    from tools import figures
    assert figures.main(["--check"]) == 0, "run: python -m tools.figures"
    for name in figures.DIAGRAMS:
        import xml.etree.ElementTree as ET
        root = ET.parse(NOTEBOOKS / "figures" / name).getroot()
        assert root.get("viewBox") and root.get("width") == "100%"      # scales to the page


def test_book_links_point_at_pages():
    from tools import book
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(
        "see [x](03_lru_cache.ipynb) and [y](05b_quantized_model.ipynb), [z](figures/a.svg)")])
    book.link_pages(nb)
    assert nb.cells[0].source == "see [x](03_lru_cache.html) and [y](05b_quantized_model.html), [z](figures/a.svg)"


# -- the builder itself ----------------------------------------------------------------------
SOURCE = '''# %% [markdown]
# {{badge}}
# # Title

# %%
x = 1

# %% tags=["setup"]

# %% [markdown]
# see {{badge 01_other}}
'''


def test_builder_expands_and_is_deterministic(tmp_path):
    src = tmp_path / "07_demo.py"
    src.write_text(SOURCE)
    a, b = _nbtools.render(_nbtools.build(src)), _nbtools.render(_nbtools.build(src))
    assert a == b
    nb = nbformat.reads(a, as_version=4)
    kinds = [c.cell_type for c in nb.cells]
    assert kinds == ["markdown", "code", "markdown", "code", "code", "markdown"]
    assert _nbtools.colab_url("07_demo") in nb.cells[0].source
    assert _nbtools.colab_url("01_other") in nb.cells[-1].source and "](01_other.ipynb)" in nb.cells[-1].source
    assert nb.cells[1].source == "x = 1" and nb.cells[0].source.endswith("# Title")
    assert "accelerator" not in nb.metadata and "jupytext" not in nb.metadata
    src.write_text(SOURCE.replace('tags=["setup"]', 'tags=["setup", "gpu"]'))
    assert _nbtools.build(src).metadata["colab"]["gpuType"] == "T4"
    src.write_text(SOURCE.replace('# %% tags=["setup"]', "# %% [setup]"))     # the old marker still works
    assert [c.cell_type for c in _nbtools.build(src).cells] == kinds


def test_builder_uses_jupytext_and_rejects_stray_text(tmp_path):
    import jupytext
    src = tmp_path / "07_demo.py"
    src.write_text(SOURCE)
    cells = jupytext.read(src, fmt="py:percent").cells
    assert [c.source for c in _nbtools.read(src).cells] == [c.source for c in cells]
    src.write_text("x = 1\n# %%\ny = 2\n")
    with pytest.raises(ValueError, match="before the first"):
        _nbtools.read(src)


def test_clean_strips_a_saved_session(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")])
    nb.cells[0].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=3)]
    nb.cells[0].execution_count = 3
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    path = tmp_path / "saved.ipynb"
    nbformat.write(nb, path)
    _nbtools.clean(path)
    raw = json.loads(path.read_text())
    assert raw["cells"][0]["outputs"] == [] and raw["cells"][0]["execution_count"] is None
    assert "widgets" not in raw["metadata"]


# -- the runtime check the setup cell prints -------------------------------------------------
def _rt(**kw):
    base = dict(colab=False, device="cpu", gpu_name=None, gpu_memory_gb=None, model="tiny",
                dtype_name="float32", real_mixtral=False)
    return Runtime(**{**base, **kw})


def test_runtime_tells_colab_cpu_users_the_menu_path():
    text = describe(_rt(colab=True), asked_for_real=True)
    assert COLAB_GPU_MENU in text and "T4 GPU" in COLAB_GPU_MENU
    assert COLAB_GPU_MENU not in describe(_rt(colab=False), asked_for_real=True)
    # without the real-model flag a CPU runtime is what the notebook asks for: no nudge to a GPU
    assert COLAB_GPU_MENU not in describe(_rt(colab=True)) and "CPU is all" in describe(_rt(colab=True))
    gpu = describe(_rt(colab=True, device="cuda", gpu_name="Tesla T4", gpu_memory_gb=14.7,
                       model="mixtral-8x7b-instruct", dtype_name="float16", real_mixtral=True))
    assert COLAB_GPU_MENU not in gpu and "Tesla T4" in gpu


def test_runtime_falls_back_to_tiny_without_gpu(monkeypatch):
    import torch
    from moe_colab.notebook.runtime import check_runtime
    monkeypatch.delenv("MOE_COLAB_MODEL", raising=False)
    rt = check_runtime(True, verbose=False)
    assert rt.real_mixtral == torch.cuda.is_available()
    assert rt.model == ("mixtral-8x7b-instruct" if rt.real_mixtral else "tiny")
    if not rt.real_mixtral:
        assert "using the small 'tiny' model" in describe(rt, asked_for_real=True)


def test_runtime_model_override_and_load_kwargs(monkeypatch, tmp_path):
    from moe_colab.notebook.runtime import check_runtime
    monkeypatch.setenv("MOE_COLAB_MODEL", str(tmp_path))
    rt = check_runtime(False, verbose=False)
    assert rt.model == str(tmp_path)
    kw = rt.load_kwargs(experts_on_device=2)
    assert kw["experts_on_device"] == 2 and kw["device"] == rt.device and kw["dtype"] == rt.dtype
    assert "quant" not in kw
    real = _rt(device="cuda", model="mixtral-8x7b-instruct", dtype_name="float16", real_mixtral=True)
    assert real.load_kwargs()["experts_on_device"] == "auto" and "quant" not in real.load_kwargs()
