# cxr-edge: `make all` sets everything up and runs the whole pipeline; `make test` runs the tests
# (`make test-device`: the device side's tests only, in minutes).
#
#   make all                               synthetic data (generated here, no downloads)
#   make all DATA=../shared/data/cxr       the real chest X-ray set
#   make train MODEL=cnn DATA=...          any registered model (train/models.py)
#   make lungs                             the lung-field segmenter (artifacts/lungs): real data's recipe
#                                          (configs/cxr.toml) crops with it; `make train` trains it when missing
#
#   make adapt RUN=... SITE=DIR            fit a run to a hospital's own labelled images -> artifacts/RUN-site
#   make app                               the screening app (Kivy) on the run's shipped variant (SHIPPED)
#   make app APP_ARGS="--kiosk --pin 2468" the screening kiosk
#   make benchmark RUN=mobilenet_v2-cxr    latency, memory, size, accuracy of every variant + the gates
#   make summary RUN=mobilenet_v2-cxr      the run on one screen (what `make all` ends with)
#   make robustness RUN=mobilenet_v2-cxr   every variant's answers under other acquisitions (blur, noise, ...)
#   make release RUN=mobilenet_v2-cxr      dist/<model>-<version>/, only when every gate passes
#   make bundle-pi RUN=mobilenet_v2-cxr    dist/ folder + tarball for 64-bit Raspberry Pi OS
#   sudo make verify-pi RUN=...            install it on an emulated aarch64 Debian 12, compare with x86
#   make fuzz FUZZ_N=20000                 mutation fuzz of the image decoder (failing files: build/fuzz-failures)
#
# Variables: VERBOSE (1: the native libraries' logs and pytest-benchmark's tables too), SYSTEM_DEPS
# (0: do not check the Debian packages in `make setup`), DATA (dataset folder; empty = the generated synthetic set), MODEL, RUN (run name,
# the folder under artifacts/), CONFIG (a TOML file of training settings), WEIGHTS, WEIGHTS_DIR,
# APP_MODEL (the app's .tflite), APP_ARGS (more `python -m edge_app app` flags),
# PRUNE (target sparsity of pruned variants, e.g. 0.5; empty, the default: none), CONVERT_ARGS (more `python -m convert` flags).
# SITE (a hospital's labelled images for `make adapt`), SITE_PER_CLASS (its images per class; 0: all).
# Benchmark and release: GATES (gates file), DEVICE (pi4, pi5, tablet: its absolute budgets, on
# that device only), VARIANTS (comma-separated, the ones to ship and gate), COMPARE (an earlier
# results JSON), RESULTS (release from these results instead of benchmarking again), VERSION,
# BENCH_ARGS (more pytest / pytest-benchmark options).
# Pi variables: PI_VARIANT (tflite variant, default SHIPPED: the smallest that passed every gate), PI_WHEELS (0: no vendored wheels),
# PI_IMAGES (test split for verify-pi), PI_PER_CLASS, PI_ROOTFS (cached emulated rootfs),
# PI_CPU (pi4: Cortex-A72, pi5: Cortex-A76), PI_TOLERANCE (largest |probability difference|).
# LUNGS_DATA: the chest X-rays with lung masks `make lungs` trains on (default ../shared/data/cxr-lungs).
# Fuzz variables: FUZZ_N (mutants), FUZZ_JOBS (worker processes), FUZZ_SEED (mutant i of a seed is reproducible).

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
SYNTHETIC   := data/synthetic
DATA        ?=
DATASET     := $(if $(DATA),$(DATA),$(SYNTHETIC))
MODEL       ?= mobilenet_v2
RUN         ?= $(MODEL)-$(if $(DATA),$(notdir $(abspath $(DATA))),synthetic)
RUN_DIR     := artifacts/$(RUN)
# Real chest X-rays: the lung-field crop recipe (configs/cxr.toml); the synthetic set has no lungs to find.
CONFIG      ?= $(if $(DATA),configs/cxr.toml,configs/synthetic.toml)
WEIGHTS_DIR ?= ../shared/weights/keras/models
# ImageNet weights only where a local copy exists, so the default run never downloads anything.
WEIGHTS     ?= $(if $(filter cnn,$(MODEL)),none,$(if $(wildcard $(WEIGHTS_DIR)/*.h5),imagenet,none))
TRAIN_ARGS  ?=
LUNGS_DATA  ?= ../shared/data/cxr-lungs
LUNGS_OUT   := artifacts/lungs
LUNG_MODEL  := $(LUNGS_OUT)/tflite/lungs-int8.tflite
# The segmenter the config crops with (its lung_model), trained first when it is missing.
LUNG_STEP   := $(if $(CONFIG),$(shell sed -En 's/^lung_model *= *"(.+)"/\1/p' $(CONFIG)))
PRUNE       ?=
CONVERT_ARGS ?=
# The variant that ships: the smallest that passed every gate of the run's benchmark
# (python -m benchmarks.gates --best); else, said out loud, the smallest that passed every gate about
# its answers (parity, accuracy, OOD: --keeping-decisions), speed and size aside; else int8.
BEST_OF      = $(shell $(PY) -m benchmarks.gates $(RUN_DIR)/reports/benchmark.json --best $(1) 2>/dev/null)
SHIPPED      = $(or $(call BEST_OF),$(warning no variant of $(RUN) passed every gate of a recorded benchmark (make benchmark))$(call BEST_OF,--keeping-decisions),$(warning no variant of $(RUN) passed every gate about its answers either: using int8)int8)
APP_MODEL   ?= $(RUN_DIR)/tflite/$(SHIPPED).tflite
APP_ARGS    ?=
GATES       ?= benchmarks/gates.toml
DEVICE      ?=
VARIANTS    ?=
COMPARE     ?=
RESULTS     ?=
VERSION     ?=
BENCH_ARGS  ?=
FUZZ_N      ?= 5000
FUZZ_JOBS   ?= 2
FUZZ_SEED   ?= 0
SITE        ?=
SITE_PER_CLASS ?= 0
# LiteRT's GPU accelerator runs on SwiftShader (Chromium's software Vulkan) where it is installed.
SWIFTSHADER := $(wildcard /usr/lib/chromium/vk_swiftshader_icd.json)
BENCH_ENV   := $(if $(SWIFTSHADER),VK_ICD_FILENAMES=$(SWIFTSHADER) XDG_RUNTIME_DIR=$${XDG_RUNTIME_DIR:-/tmp})
PI_VARIANT  ?= $(SHIPPED)
PI_WHEELS   ?= 1
PI_IMAGES   ?= $(if $(DATA),$(DATA),../shared/data/cxr)/test
PI_PER_CLASS ?= 4
PI_ROOTFS   ?= build/pi-rootfs
PI_CPU      ?= pi4
PI_TOLERANCE ?= 1e-4
SYSTEM_DEPS ?= 1
VERBOSE     ?=
# Native libraries' logs (LiteRT, TensorFlow) and pytest-benchmark's tables only with VERBOSE=1.
ifeq ($(VERBOSE),1)
export CXR_EDGE_VERBOSE := 1
BENCH_QUIET :=
else
BENCH_QUIET := --benchmark-quiet -rfE
endif
PI_BUNDLE    = dist/cxr-edge-pi-$(RUN)-$(PI_VARIANT)
PREDICT_IMAGE = $(firstword $(wildcard $(DATASET)/test/covid/* $(DATASET)/test/pneumonia/*))

.PHONY: all summary robustness setup system-deps data train lungs adapt convert benchmark release predict app bundle-pi verify-pi \
        test test-device fuzz clean

CONVERT      = $(PY) -m convert $(RUN_DIR) $(if $(PRUNE),--prune $(PRUNE)) $(CONVERT_ARGS)

# The gates are printed but do not stop the demo: they stop a release (`make release`). A failed
# parity gate is `python -m convert`'s exit status 3 (every file is written); any other error stops.
all: data train
	$(CONVERT) || test $$? -eq 3
	-$(MAKE) --no-print-directory benchmark
	$(MAKE) --no-print-directory predict
	@$(MAKE) --no-print-directory summary

# The Debian packages (GUI, GPU, bundle checks): installed as root, else the command is printed.
system-deps:
ifneq ($(SYSTEM_DEPS),0)
	@scripts/install-system-deps.sh
endif

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[edge,train,dev]"
	touch $@

setup: system-deps $(VENV)/.installed

data: setup
ifeq ($(DATA),)
	$(PY) -m train.data.synthetic --out $(SYNTHETIC) --per-class 200 60 60
else
	@test -d "$(DATA)" || { echo "DATA=$(DATA) is not a folder"; exit 1; }
endif

train: setup data $(LUNG_STEP)
	$(PY) -m train --model $(MODEL) --data $(DATASET) --out $(RUN_DIR) --weights $(WEIGHTS) \
		--weights-dir $(WEIGHTS_DIR) $(if $(CONFIG),--config $(CONFIG)) $(TRAIN_ARGS)

lungs: setup
	@test -f "$(LUNGS_DATA)/manifest.csv" || { echo "LUNGS_DATA=$(LUNGS_DATA) is not a cxr-lungs folder (manifest.csv, train/, val/);" \
		"without the lung-field segmenter, train the recipe without the lung-field crop: make train CONFIG="; exit 1; }
	$(PY) -m train.lungs --data $(LUNGS_DATA) --out $(LUNGS_OUT)

$(LUNG_MODEL):
	$(MAKE) --no-print-directory lungs

adapt: setup
	@test -d "$(SITE)" || { echo "SITE=$(SITE) is not a folder of the site's labelled images"; exit 1; }
	$(PY) -m train adapt --run $(RUN_DIR) --data $(SITE) --out $(RUN_DIR)-site --per-class $(SITE_PER_CLASS)

convert: setup
	$(CONVERT)

benchmark: setup
	$(BENCH_ENV) $(PY) -m benchmarks -q $(BENCH_QUIET) -p no:cacheprovider --run $(RUN_DIR) --gates $(GATES) \
		$(if $(DEVICE),--device $(DEVICE)) $(if $(VARIANTS),--variants $(VARIANTS)) \
		$(if $(COMPARE),--compare $(COMPARE)) --benchmark-json=$(RUN_DIR)/reports/pytest-benchmark.json $(BENCH_ARGS)

# Every variant on the test films as other acquisitions would give them: reports/robustness.{json,md,png}
# (`make benchmark` measures it too, for the [robustness] gate).
robustness: setup
	$(PY) -m benchmarks.robustness --run $(RUN_DIR)

# The run on one screen: data, Keras metrics, variants (size, parity, GPU, latency, gates), failures.
summary: setup
	@$(PY) -m benchmarks.summary $(RUN_DIR)

release: setup $(if $(RESULTS),,benchmark)
	$(PY) -m benchmarks.release $(RUN_DIR) --gates $(GATES) $(if $(RESULTS),--results $(RESULTS)) \
		$(if $(DEVICE),--device $(DEVICE)) $(if $(VARIANTS),--variants $(VARIANTS)) $(if $(VERSION),--version $(VERSION))

predict: setup
	$(PY) -m edge_app predict $(PREDICT_IMAGE) --model $(APP_MODEL)

app: setup
	$(PY) -m edge_app app $(if $(wildcard $(APP_MODEL)),--model $(APP_MODEL)) $(APP_ARGS)

bundle-pi: setup
	$(PY) -m edge_app.deploy.pi build $(RUN_DIR) --variant $(PI_VARIANT) $(if $(filter 0,$(PI_WHEELS)),--no-wheels)

verify-pi: bundle-pi
	$(PY) -m edge_app.deploy.verify_pi $(PI_BUNDLE).tar.gz --images $(PI_IMAGES) \
		--per-class $(PI_PER_CLASS) --rootfs $(PI_ROOTFS) --cpu $(PI_CPU) \
		--tolerance $(PI_TOLERANCE) --out build/verify-pi-$(PI_CPU)-$(PI_VARIANT)

test: setup
	$(PY) -m pytest

# The device side only (edge_app, history, app, runtimes) on one small converted run: minutes.
test-device: setup
	$(PY) -m pytest -m device

fuzz: setup
	FUZZ_N=$(FUZZ_N) FUZZ_JOBS=$(FUZZ_JOBS) FUZZ_SEED=$(FUZZ_SEED) $(PY) -m pytest tests/test_image_fuzz.py \
		-q -p no:cacheprovider -k mutated

clean:
	rm -rf artifacts data/synthetic benchmarks/results dist .pytest_cache .benchmarks
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
