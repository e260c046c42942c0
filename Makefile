# JEM-EO: `make demo` runs the main job on bundled data, `make test` runs ruff and the whole suite,
# `make test-quick` all but the long tests, `make lint` runs ruff (configured in pyproject.toml).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SYSTEM_PY := /usr/bin/python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := qgis python3-qgis python3-gdal python3-rasterio python3-matplotlib xvfb
PIP_PACKAGES := torch==2.13.0 pytest pytest-qgis matplotlib hypothesis ruff==0.17.6
export QT_QPA_PLATFORM ?= offscreen

.PHONY: setup system-packages test test-quick lint demo package clean

setup: system-packages $(VENV)/.installed

# Debian's QGIS, GDAL, rasterio, numpy and matplotlib: one GDAL in the process.
system-packages:
	@$(SYSTEM_PY) -c "import qgis.core, osgeo.gdal, rasterio, matplotlib" 2>/dev/null || { \
	  $(SUDO) apt-get update && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends $(APT_PACKAGES); }

# numpy stays Debian's (GDAL and rasterio are built against it): pin it for pip.
$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(SYSTEM_PY) -m venv --system-site-packages $(VENV)
	$(SYSTEM_PY) -c "import numpy; print('numpy==' + numpy.__version__)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q --disable-pip-version-check -c $(VENV)/constraints.txt $(PIP_PACKAGES)
	$(PY) -m pip install -q --disable-pip-version-check -c $(VENV)/constraints.txt --no-deps -e .
	@touch $@

# The linter first (seconds), then the whole suite.
test: lint
	$(PY) -m pytest -q tests

# Everything but the tests marked slow (SIGKILL/resume, DDP, benchmarks, huge rasters).
test-quick: setup
	$(PY) -m pytest -q -m "not slow" tests

lint: setup
	$(PY) -m ruff check jem_core jem_qgis_plugin tests bench

# Class map, confidence max p(y|x), familiarity −E(x) and a PNG preview of the bundled Sentinel-2 crop of Beirut
# (demo/README.md).
demo: setup
	$(PY) -m jem_core demo --out demo_out

# The installable QGIS plugin zip (plugin, metadata.txt, icons, QML styles, jem_core inside); stdlib only.
PLUGIN_ZIP ?= dist/jem_qgis_plugin.zip
package:
	$(SYSTEM_PY) -m jem_qgis_plugin.packaging $(PLUGIN_ZIP)

clean:
	rm -rf $(VENV) dist build *.egg-info .pytest_cache
