# Two entry points, both self-installing on a fresh machine:
#   make run   -- install and run the main job on bundled data
#   make test  -- install and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; an unpinned torch may pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-deepinv run test lint docs format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Optional: deepinv forward operators (bilevel[deepinv]) and TensorBoard, torch kept at its pin
# (deepinv's torchvision must be the build of that torch: a CPU torch needs a CPU torchvision).
install-deepinv: install
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" -e ".[deepinv,tensorboard]"

run: install
	$(BIN)/bilevel denoise

# One pytest worker per core (pytest-xdist; each test runs single-threaded), whole files per
# worker so that module fixtures are built once. pytest exits 5 when it collects nothing: that
# is a failure, not a pass.
test: install
	@$(BIN)/python -m pytest -q -n auto --dist loadfile; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: install
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

# The user guide and API reference (MkDocs + mkdocstrings, from the docstrings) into
# build/site; any warning (a broken link, a docstring that does not parse) is an error.
docs: install
	$(BIN)/mkdocs build --strict --site-dir build/site

format: install
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
