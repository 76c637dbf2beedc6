"""Build the teaching notebooks from plain Python sources, so they are reviewable and clean.

    notebooks/src/01_router_analysis.py  --python -m tools.nbbuild-->  notebooks/01_router_analysis.ipynb

The sources are jupytext's "percent" format (``# %%`` starts a code cell, ``# %% [markdown]`` a
markdown cell written as ``# text`` lines, ``# %% tags=["..."]`` adds cell tags); jupytext does
the conversion. This file only adds what jupytext cannot know:

    {{badge}}                the "Open in Colab" badge of this notebook
    {{badge NAME}}           the badge of notebook NAME, with a relative link beside it, so a
                             reader in JupyterLab, Binder or the book stays where they are
    # %% tags=["setup"]      the standard setup: a "## 0. Setup" heading, the Colab-only install
                             cell (never touches Colab's torch; enables Colab's widget manager) and
                             the runtime check cell (moe_colab.notebook.runtime.check_runtime)
    # %% tags=["setup", "gpu"]   the same, and Colab opens the notebook on a T4 runtime; without
                             "gpu" it opens on a CPU runtime (the real-model flag then says how to
                             switch)

Built notebooks have no outputs, no execution counts and no widget state, and deterministic cell
ids, so building twice gives the same bytes.

    python -m tools.nbbuild            rebuild notebooks/*.ipynb from notebooks/src/*.py
    python -m tools.nbbuild --check    exit 1 if a committed notebook differs from its source
    python -m tools.nbbuild --clean F  strip outputs and widget state from notebook F in place
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

import jupytext
import nbformat

# The GitHub repository the badges and the Colab install cell point at. "OWNER" is a
# placeholder until the repository is published (the README says so); change it here and rebuild.
REPO = "OWNER/moe_colab"
BRANCH = "main"
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
BADGE_IMG = "https://colab.research.google.com/assets/colab-badge.svg"

BASE_METADATA = {
    "colab": {"provenance": [], "toc_visible": True},
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}
GPU_METADATA = {"accelerator": "GPU", "colab": {"gpuType": "T4"}}

INSTALL_CELL = f'''\
# Colab only: install moe_colab (Colab's preinstalled torch is kept, never reinstalled) and let
# third-party widgets render. Elsewhere this cell does nothing.
import sys
if "google.colab" in sys.modules:
    !pip install -q "moe_colab @ git+https://github.com/{REPO}"
    from google.colab import output
    output.enable_custom_widget_manager()'''

RUNTIME_CELL = '''\
from moe_colab.notebook.runtime import check_runtime

rt = check_runtime(USE_REAL_MIXTRAL)   # prints the device and the model this notebook will use'''

SETUP_MARKDOWN = '''\
## 0. Setup
Run these two cells first. On Colab the first installs `moe_colab`; anywhere else it does
nothing (install with `pip install -e .` from a clone, or use Binder). The second prints the
device and the model this notebook will use.'''


def colab_url(name: str) -> str:
    return f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/notebooks/{name}.ipynb"


def badge(name: str) -> str:
    return f"[![Open In Colab]({BADGE_IMG})]({colab_url(name)})"


def badge_with_link(name: str) -> str:
    """The Colab badge and, beside it, a relative link that works in JupyterLab, Binder and the book."""
    return f"{badge(name)} or [{name}.ipynb]({name}.ipynb) here"


def read(source: Path) -> nbformat.NotebookNode:
    """The source as jupytext reads it (one cell per ``# %%`` marker)."""
    text = source.read_text()
    if text.strip() and not text.lstrip().startswith("# %%"):
        raise ValueError(f"{source.name}: text before the first '# %%' marker")
    # the marker of the hand-written builder this replaced, still accepted
    text = re.sub(r"^# %% \[setup\]\s*$", '# %% tags=["setup"]', text, flags=re.M)
    return jupytext.reads(text, fmt="py:percent")


def build(source: Path) -> nbformat.NotebookNode:
    name = source.stem
    cells, gpu = [], False
    for cell in read(source).cells:
        tags = cell.metadata.get("tags", [])
        if "setup" in tags:
            gpu = gpu or "gpu" in tags
            cells += [nbformat.v4.new_markdown_cell(SETUP_MARKDOWN),
                      nbformat.v4.new_code_cell(INSTALL_CELL), nbformat.v4.new_code_cell(RUNTIME_CELL)]
            continue
        text = cell.source
        if cell.cell_type == "markdown":
            text = re.sub(r"\{\{badge (\w+)\}\}", lambda m: badge_with_link(m.group(1)), text)
            text = text.replace("{{badge}}", badge(name))
            new = nbformat.v4.new_markdown_cell(text)
        else:
            new = nbformat.v4.new_code_cell(text)
        keep = {k: v for k, v in cell.metadata.items() if k in ("tags", "jupyter")}
        new.metadata.update(keep)
        cells.append(new)
    for i, cell in enumerate(cells):
        cell["id"] = f"{name[:40]}-{i:03d}"   # deterministic: rebuilding changes nothing
    metadata = copy.deepcopy(BASE_METADATA)
    if gpu:
        metadata["accelerator"] = GPU_METADATA["accelerator"]
        metadata["colab"].update(GPU_METADATA["colab"])
    nb = nbformat.v4.new_notebook(cells=cells, metadata=metadata)
    nb.nbformat, nb.nbformat_minor = 4, 5
    nbformat.validate(nb)
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def clean(path: Path) -> None:
    """Strip outputs, execution counts and widget state from a notebook saved by Jupyter."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    path.write_text(render(nb))


def sources(folder: Path = NOTEBOOKS) -> list[Path]:
    return sorted((folder / "src").glob("[0-9][0-9]*_*.py"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if a notebook differs from its source")
    ap.add_argument("--clean", type=Path, metavar="NOTEBOOK", help="strip outputs of one notebook")
    ap.add_argument("--dir", type=Path, default=NOTEBOOKS, help="the notebooks folder")
    args = ap.parse_args(argv)
    if args.clean:
        clean(args.clean)
        return 0
    stale = []
    for src in sources(args.dir):
        target = args.dir / f"{src.stem}.ipynb"
        text = render(build(src))
        if args.check:
            if not target.is_file() or target.read_text() != text:
                stale.append(target.name)
        elif not target.is_file() or target.read_text() != text:
            target.write_text(text)
            print(f"wrote {target}")
    if stale:
        print(f"out of date with notebooks/src (run python -m tools.nbbuild): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
