# reflservd: `make demo` runs a first fit end to end; `make test` runs the tests.
# Tested with CPython 3.11 on Debian 12.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Debian packages the tests use: AppArmor's compiler, Chromium for the pages, systemd-analyze
# for the units, a one-node Slurm with MPI (libpmix-dev: slurm-wlm's mpi/pmix loads libpmix.so,
# which only it ships; libopenmpi-dev: the venv's mpi4py is built against Debian's Open MPI).
DEBS   := apparmor chromium chromium-driver util-linux iproute2 shellcheck logrotate python3-venv adduser openssl curl \
          systemd slurm-wlm munge openmpi-bin python3-mpi4py libpmix-dev libopenmpi-dev

.PHONY: venv sysdeps test fuzz demo bench clean

$(STAMP): setup.py
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is needed (CPython 3.11)"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	extras=test; if [ -e "$$(mpicc -showme:incdirs 2>/dev/null | cut -d' ' -f1)/mpi.h" ]; then extras=test,mpi; fi; \
	PIP_NO_BINARY=mpi4py $(BIN)/pip install -q -e ".[$$extras]" --config-settings editable_mode=compat
	touch $(STAMP)

venv: $(STAMP)

sysdeps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "not root: the tests that need these Debian packages will be skipped:$$missing"; \
	  fi; \
	fi

test: sysdeps venv
	$(BIN)/python -m pytest -q test

# The fuzzing of test/test_fuzz.py at 1,000 cases per operation (make test runs 80).
FUZZ_EXAMPLES ?= 1000
fuzz: venv
	REFLSERVD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q test/test_fuzz.py

demo: venv
	$(BIN)/python -m reflservd.demo $(ARGS)

bench: venv
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) var demo-results build *.egg-info
