# Two entry points for people and CI: `make demo` and `make test`. Both install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
# Machines without CUDA take the CPU build of torch (on this project's machines it lies on disk;
# a newer or unpinned torch would pull a multi-GB CUDA build). Colab users never run this: their
# torch is left alone. Override with `make TORCH_CPU_SPEC=... test`.
TORCH_CPU_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test test-fast test-gpu docs clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" >/dev/null 2>&1; then \
		$(PY) -m pip install -q "$(TORCH_CPU_SPEC)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(PY) -m moe_colab generate --model tiny --prompt "def fibonacci(n):" --max-new-tokens 48 --experts-on-device 4

test: install
	$(PY) -m pytest -q tests notebooks --nbval-lax $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -x tests -m "not slow and not browser" $(PYTEST_ARGS)

# The rendered book of the executed notebooks (HTML in build/book; open build/book/index.html).
docs: install $(VENV)/.docs-installed
	$(PY) -m tools.book
	cd build && NO_MKDOCS_2_WARNING=1 $(abspath $(VENV))/bin/mkdocs build -q -f ../book/mkdocs.yml   # cache: build/.cache
	@echo "book: build/book/index.html"

$(VENV)/.docs-installed: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,docs]"
	touch $@

test-gpu: install
	$(PY) -m pytest -q tests -m gpu $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build/book build/book-src
