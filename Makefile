# fibquant: `make demo` runs the main job on the sample data, `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := out/demo

.PHONY: install test lint demo bench codebooks clean compress-all

install: $(STAMP)

# The CPU build of torch, installed before the hf extra so pip never resolves the CUDA one.
TORCH  ?= torch==2.13.0

# Re-installs only when pyproject.toml changes, so a second `make install` is instant.
# The hf extra (torch, transformers) is for the --model commands and their tests; batch
# (dask distributed, fsspec) for `fibquant batch` and its tests.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check '$(TORCH)'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,hf,batch]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

demo: install
	mkdir -p $(DEMO)
	$(BIN)/fibquant compress sample_data/kv_sample.safetensors --bits 3 --compare --force \
		-o $(DEMO)/kv_sample.fq.safetensors
	$(BIN)/fibquant validate $(DEMO)/kv_sample.fq.safetensors
	$(BIN)/fibquant decompress $(DEMO)/kv_sample.fq.safetensors --force \
		-o $(DEMO)/kv_sample.restored.safetensors

# The benchmark compares against llama.cpp's Q4_0 (the gguf package) and plots: extras.
$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,peers,plot]'
	touch $@

# Runs scripts/bench.py, bench_pipeline.py and bench_batch.py (batch throughput with 1 and 2
# workers next to compress-all) and writes their tables to docs/benchmarks.md.
bench: $(VENV)/.bench-installed
	$(BIN)/python scripts/bench_report.py

# Batch: compress every dump X.safetensors (with X.manifest.json) of DIR into OUT, in parallel
# with make's -j, skipping outputs newer than their dump and manifest:
#   make -j2 compress-all DIR=dumps BITS=2
# `fibquant batch compress DIR OUT --bits 2` does the same on a Dask cluster (one machine or
# many; docs/batch.md), skipping by content digests and options rather than times.
DIR   ?= sample_data
BITS  ?= 3
OUT   ?= $(DIR)/fq-bits$(BITS)
DUMPS := $(filter-out %.fq.safetensors %.restored.safetensors,$(wildcard $(DIR)/*.safetensors))
FQ    := $(patsubst $(DIR)/%.safetensors,$(OUT)/%.fq.safetensors,$(DUMPS))

compress-all: $(FQ)
	@echo "compress-all: $(words $(FQ)) dump(s) of $(DIR) up to date in $(OUT)"

$(OUT)/%.fq.safetensors: $(DIR)/%.safetensors $(DIR)/%.manifest.json | $(STAMP)
	@mkdir -p $(OUT)
	$(BIN)/fibquant compress $< --bits $(BITS) --jobs 1 --no-attention --force -o $@ > $@.log

# Retrain the codebooks shipped in fibquant_cli/codebooks (after an algorithm change).
codebooks: install
	$(BIN)/python scripts/build_codebooks.py

clean:
	rm -rf out .pytest_cache
