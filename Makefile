# Two entry points for a newcomer (see README): `make demo` and `make test`.
# Both build a virtual environment from scratch on a fresh machine; CI pins torch to the CPU build.
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCES := $(shell find agent aggregator -name '*.py') pyproject.toml constraints.txt

# Real Prometheus and Alertmanager for the tests, from Debian's packages.
PROM_TOOLS := /usr/bin/prometheus /usr/bin/promtool /usr/bin/prometheus-alertmanager /usr/bin/amtool
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test clean

# A non-editable install: the tests exercise the package exactly as users get it.
$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/torchrun --nproc-per-node 2 examples/train_ddp.py

# pytest exits 5 when it collected nothing; make fails on any non-zero exit, so that cannot pass.
test: $(VENV)/.installed $(PROM_TOOLS)
	$(PY) -m pytest

$(PROM_TOOLS):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq prometheus prometheus-alertmanager

clean:
	rm -rf $(VENV) build out *.egg-info
