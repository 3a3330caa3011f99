# Two set-up-and-go targets for a fresh machine: `make demo` and `make test`.
# Both create .venv, install the pinned CPU torch first, then the project with its extras.
TORCH_VERSION ?= 2.13.0
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(TORCH_VERSION)
export PIP_CONSTRAINT := $(CURDIR)/$(VENV)/torch-constraint.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv demo test lint simulate clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	echo "torch==$(TORCH_VERSION)" > $(PIP_CONSTRAINT)
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[dev]"
	touch $@

demo: venv
	$(VENV)/bin/bitpipe-fx demo --overwrite   # a rerun replaces runs/demo (train refuses without it)

simulate: venv
	$(VENV)/bin/bitpipe-fx simulate --devices 8 --microbatches 16

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
