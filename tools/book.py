"""Prepare the rendered book: execute every notebook into build/book-src, ready for mkdocs.

    python -m tools.book            execute notebooks/*.ipynb (static figures), copy the figures
                                    and book/index.md; then `mkdocs build -f book/mkdocs.yml`
    (`make docs` runs both)

Each notebook runs on CPU with the shipped `tiny` model and ``MOE_COLAB_STATIC=1`` (no live
widgets: a static page cannot run their kernel side; every figure carries its SVG and plotly
JSON, and the page shows the SVG). A notebook that fails stops the build with its error.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
OUT = ROOT / "build" / "book-src"


def link_pages(nb) -> None:
    """Links between notebooks (``](NN_name.ipynb)``) point at their pages in the book."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = re.sub(r"\]\((\d\d\w*)\.ipynb\)", r"](\1.html)", cell.source)


def execute(path: Path, out_dir: Path, timeout: int = 600) -> float:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    link_pages(nb)
    nbformat.write(nb, out_dir / path.name)
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("names", nargs="*", help="notebook stems to execute (default: all)")
    args = ap.parse_args(argv)
    os.environ["MOE_COLAB_STATIC"] = "1"
    os.environ.pop("MOE_COLAB_MODEL", None)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    shutil.copytree(NOTEBOOKS / "figures", args.out / "figures")
    shutil.copyfile(ROOT / "book" / "index.md", args.out / "index.md")
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]*_*.ipynb"))
    if args.names:
        paths = [p for p in paths if p.stem in args.names]
    for path in paths:
        seconds = execute(path, args.out)
        print(f"executed {path.name} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
