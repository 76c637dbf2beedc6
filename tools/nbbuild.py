"""Build the teaching notebooks from plain Python sources, so they are reviewable and clean.

    notebooks/src/01_router_analysis.py  --python -m tools.nbbuild-->  notebooks/01_router_analysis.ipynb

A source is in "percent" format: ``# %%`` starts a code cell, ``# %% [markdown]`` a markdown
cell whose lines are written as ``# text``. Three expansions keep every notebook's skeleton the
same:

    {{badge}}            the "Open in Colab" badge of this notebook
    {{badge NAME}}       the badge of notebook NAME (for the index)
    # %% [setup]         the standard setup: a "## 0. Setup" heading, the Colab-only install cell
                         (never touches Colab's torch; enables Colab's widget manager) and the
                         runtime check cell (moe_colab.notebook.runtime.check_runtime)

Built notebooks have no outputs, no execution counts and no widget state, carry Colab's
``gpuType: T4`` metadata and deterministic cell ids, so building twice gives the same bytes.

    python -m tools.nbbuild            rebuild notebooks/*.ipynb from notebooks/src/*.py
    python -m tools.nbbuild --check    exit 1 if a committed notebook differs from its source
    python -m tools.nbbuild --clean F  strip outputs and widget state from notebook F in place
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import nbformat

# The GitHub repository the badges and the Colab install cell point at. "OWNER" is a
# placeholder until the repository is published (the README says so); change it here and rebuild.
REPO = "OWNER/moe_colab"
BRANCH = "main"
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
BADGE_IMG = "https://colab.research.google.com/assets/colab-badge.svg"

NOTEBOOK_METADATA = {
    "accelerator": "GPU",
    "colab": {"gpuType": "T4", "provenance": [], "toc_visible": True},
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}

INSTALL_CELL = f'''\
# Colab only: install moe_colab (Colab's preinstalled torch is kept, never reinstalled) and let
# third-party widgets (plotly's FigureWidget) render. Elsewhere this cell does nothing.
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


def parse(text: str) -> list[tuple[str, str]]:
    """Percent-format source -> [(kind, source)] with kind in "code", "markdown", "setup"."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        m = re.match(r"^# %%\s*(\[(\w+)\])?\s*$", line)
        if m:
            cells.append((m.group(2) or "code", []))
        elif not cells:
            if line.strip():
                raise ValueError(f"text before the first '# %%' marker: {line!r}")
        else:
            cells[-1][1].append(line)
    out = []
    for kind, lines in cells:
        if kind not in ("code", "markdown", "setup"):
            raise ValueError(f"unknown cell kind [{kind}] (use code, markdown or setup)")
        if kind == "markdown":
            bad = [l for l in lines if l and not l.startswith("#")]
            if bad:
                raise ValueError(f"markdown line not written as a comment: {bad[0]!r}")
            lines = [l[2:] if l.startswith("# ") else l[1:] for l in lines]
        out.append((kind, "\n".join(lines).strip("\n")))
    return out


def build(source: Path) -> nbformat.NotebookNode:
    name = source.stem
    cells = []
    for kind, text in parse(source.read_text()):
        text = re.sub(r"\{\{badge (\w+)\}\}", lambda m: badge(m.group(1)), text)
        text = text.replace("{{badge}}", badge(name))
        if kind == "setup":
            cells += [nbformat.v4.new_markdown_cell(SETUP_MARKDOWN),
                      nbformat.v4.new_code_cell(INSTALL_CELL), nbformat.v4.new_code_cell(RUNTIME_CELL)]
        elif kind == "markdown":
            cells.append(nbformat.v4.new_markdown_cell(text))
        else:
            cells.append(nbformat.v4.new_code_cell(text))
    for i, cell in enumerate(cells):
        cell["id"] = f"{name[:40]}-{i:03d}"   # deterministic: rebuilding changes nothing
    nb = nbformat.v4.new_notebook(cells=cells, metadata=json.loads(json.dumps(NOTEBOOK_METADATA)))
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
    return sorted((folder / "src").glob("[0-9][0-9]_*.py"))


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
