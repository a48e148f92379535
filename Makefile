# sorakit: `make demo` runs the toy workflow end to end, `make test` runs the test suite.
# Both create .venv on first use and reinstall nothing on later runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUN    ?= runs/demo
# The demo's budget, counted from when `make demo` starts (installing included).
DEMO_MINUTES ?= 60
START  := $(shell date +%s)

.PHONY: install test demo smoke bench clean

install: $(STAMP)

# Re-installs only when the project's dependency list changes.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# tests/test_workflow.py runs `make smoke` too: the whole chain at tiny sizes.
test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(MAKE) -C recipes/toy all RUN=$(abspath $(RUN)) SORAKIT=$(abspath $(VENV))/bin/sorakit \
		DEMO_END=$$(( $(START) + $(DEMO_MINUTES) * 60 ))
	@echo "make demo: done in $$(( ($$(date +%s) - $(START)) / 60 )) min (budget $(DEMO_MINUTES))"

smoke: $(STAMP)
	rm -rf runs/smoke
	$(MAKE) -C recipes/toy smoke RUN=$(abspath runs/smoke) SORAKIT=$(abspath $(VENV))/bin/sorakit

bench: $(STAMP)
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs
