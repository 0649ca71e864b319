# fibquant: `make demo` runs the main job on the sample data, `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := out/demo

.PHONY: install test demo bench codebooks clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes, so a second `make install` is instant.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest

demo: install
	mkdir -p $(DEMO)
	$(BIN)/fibquant compress sample_data/kv_sample.safetensors --bits 3 --compare --force \
		-o $(DEMO)/kv_sample.fq.safetensors
	$(BIN)/fibquant validate $(DEMO)/kv_sample.fq.safetensors
	$(BIN)/fibquant decompress $(DEMO)/kv_sample.fq.safetensors --force \
		-o $(DEMO)/kv_sample.restored.safetensors

bench: install
	$(BIN)/python scripts/bench.py

# Retrain the codebooks shipped in fibquant_cli/codebooks (after an algorithm change).
codebooks: install
	$(BIN)/python scripts/build_codebooks.py

clean:
	rm -rf out .pytest_cache
