# Two entry points for a newcomer (see README): `make demo` and `make test`.
# Both build a virtual environment from scratch on a fresh machine; CI pins torch to the CPU build.
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCES := $(shell find agent aggregator demo dashboards wire cli -name '*.py' -o -name '*.yaml' -o -name '*.json' | grep -v __pycache__) \
	deploy/__init__.py deploy/prometheus/prometheus.yml deploy/alertmanager/alertmanager.yml pyproject.toml constraints.txt

# Real Prometheus and Alertmanager for the tests, from Debian's packages.
PROM_TOOLS := /usr/bin/prometheus /usr/bin/promtool /usr/bin/prometheus-alertmanager /usr/bin/amtool
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test clean

# A non-editable install: the tests exercise the package exactly as users get it.
$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt ".[test]"
	touch $@

# The main job: a real 2-rank torchrun job with a fault, on the full stack when Prometheus and
# Alertmanager are installed (else the embedded default; it says how to install them). Pass options
# through DEMO, e.g. `make demo DEMO="--scenario vanishing"`.
demo: $(VENV)/.demo-installed
	$(VENV)/bin/gradwatch demo $(DEMO)

$(VENV)/.demo-installed: $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt ".[demo]"
	touch $@

# pytest exits 5 when it collected nothing; make fails on any non-zero exit, so that cannot pass.
test: $(VENV)/.installed $(PROM_TOOLS)
	$(PY) -m pytest

$(PROM_TOOLS):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq prometheus prometheus-alertmanager

clean:
	rm -rf $(VENV) build out gradwatch-demo *.egg-info
