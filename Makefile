# cxr-edge: `make all` sets everything up and runs the whole pipeline; `make test` runs the tests.
#
#   make all                               synthetic data (generated here, no downloads)
#   make all DATA=../shared/data/cxr       the real chest X-ray set
#   make train MODEL=cnn DATA=...          any registered model (train/models.py)
#
# Variables: DATA (dataset folder; empty = the generated synthetic set), MODEL, RUN (run name,
# the folder under artifacts/), CONFIG (a TOML file of training settings), WEIGHTS, WEIGHTS_DIR,
# PRUNE (target sparsity of the pruned variants; empty: none), CONVERT_ARGS (more `python -m convert` flags).

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
SYNTHETIC   := data/synthetic
DATA        ?=
DATASET     := $(if $(DATA),$(DATA),$(SYNTHETIC))
MODEL       ?= mobilenet_v2
RUN         ?= $(MODEL)-$(if $(DATA),$(notdir $(abspath $(DATA))),synthetic)
RUN_DIR     := artifacts/$(RUN)
CONFIG      ?= $(if $(DATA),,configs/synthetic.toml)
WEIGHTS_DIR ?= ../shared/weights/keras/models
# ImageNet weights only where a local copy exists, so the default run never downloads anything.
WEIGHTS     ?= $(if $(filter cnn,$(MODEL)),none,$(if $(wildcard $(WEIGHTS_DIR)/*.h5),imagenet,none))
TRAIN_ARGS  ?=
PRUNE       ?= 0.5
CONVERT_ARGS ?=
PREDICT_IMAGE = $(firstword $(wildcard $(DATASET)/test/covid/* $(DATASET)/test/pneumonia/*))

.PHONY: all setup data train convert benchmark predict test clean

all: data train convert benchmark predict

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[edge,train,dev]"
	touch $@

setup: $(VENV)/.installed

data: setup
ifeq ($(DATA),)
	$(PY) -m train.data.synthetic --out $(SYNTHETIC) --per-class 200 60 60
else
	@test -d "$(DATA)" || { echo "DATA=$(DATA) is not a folder"; exit 1; }
endif

train: setup data
	$(PY) -m train --model $(MODEL) --data $(DATASET) --out $(RUN_DIR) --weights $(WEIGHTS) \
		--weights-dir $(WEIGHTS_DIR) $(if $(CONFIG),--config $(CONFIG)) $(TRAIN_ARGS)

convert: setup
	$(PY) -m convert $(RUN_DIR) $(if $(PRUNE),--prune $(PRUNE)) $(CONVERT_ARGS)

benchmark: setup
	CXR_RUN=$(RUN_DIR) $(PY) -m pytest benchmarks -q -p no:cacheprovider \
		--benchmark-json=$(RUN_DIR)/reports/benchmark.json

predict: setup
	$(PY) -m edge_app predict $(PREDICT_IMAGE) --model $(RUN_DIR)/tflite/int8.tflite

test: setup
	$(PY) -m pytest

clean:
	rm -rf artifacts data/synthetic benchmarks/results .pytest_cache .benchmarks
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
