# hetconv: everything runs inside a project-local virtual environment.
PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# The torch build this machine kind provides locally (override for other machines).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
STAMP      := $(VENV)/.hetconv-setup

.PHONY: setup data demo test bench clean help

help:
	@echo "make demo   set up, then train + evaluate a small HetConv model on Fashion-MNIST"
	@echo "make test   set up, then run the test suite"
	@echo "make bench  set up, then run the speed benchmark (writes docs/performance.md)"

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test,all]'
	@touch $@

setup: $(STAMP)

# Fashion-MNIST from Debian (the embedded default data set).
data:
	@if [ -n "$$HETCONV_DATA" ] && [ -e "$$HETCONV_DATA/fashion-mnist" ]; then :; \
	elif [ -e "$(FMNIST_DIR)/train-images-idx3-ubyte.gz" ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST is missing. Install it with:"; \
	  echo "  sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"; \
	  exit 1; \
	fi

# The demo: a quarter-width HetConv VGG-16 (P=4) and its dense twin trained briefly on the
# real Fashion-MNIST (preset `quick`), evaluated (the P4 one as trained, then both as
# optimize_for_inference deploys them: their images/s) and compared (runs/demo/, a few minutes).
DEMO_OUT   ?= runs/demo
demo: setup data
	$(PY) -m hetconv demo
	$(PY) -m hetconv train --preset quick --out $(DEMO_OUT) --name vgg16_p4 --force
	$(PY) -m hetconv train --preset quick --model vgg16_cifar --out $(DEMO_OUT) --name vgg16_dense --force
	$(PY) -m hetconv evaluate $(DEMO_OUT)/vgg16_p4
	$(PY) -m hetconv evaluate $(DEMO_OUT)/vgg16_p4 --optimize
	$(PY) -m hetconv evaluate $(DEMO_OUT)/vgg16_dense --optimize
	$(PY) -m hetconv compare $(DEMO_OUT)/vgg16_dense $(DEMO_OUT)/vgg16_p4 --plot $(DEMO_OUT)/accuracy_vs_macs.png

test: setup
	$(PY) -m pytest -q -n 2

bench: setup
	$(PY) -m hetconv bench

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
