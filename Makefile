# fedrun: `make run` and `make test` set up everything they need, then do their job.
PYTHON_BOOT ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.fedrun-installed
CONFIG      ?= configs/default.toml
ARGS        ?=
DEBIAN_DATA := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data run quick test test-slurm test-all bench tensorboard clean

setup: $(STAMP)

# Quick when done: the stamp is newer than the pins unless they changed.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Fashion-MNIST from Debian's package when we may install it; otherwise fedrun falls
# back to data.root or torchvision's download and says so if both fail.
data:
	@if [ -f $(DEBIAN_DATA) ]; then echo "data: Debian's dataset-fashion-mnist is installed"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -q dataset-fashion-mnist || \
	   (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null \
	  && echo "data: installed dataset-fashion-mnist"; \
	else echo "data: not root; fedrun will use data.root or download Fashion-MNIST"; fi

run: setup data
	launch/local.sh $(CONFIG) $(ARGS)

quick: setup data
	launch/local.sh configs/quick.toml $(ARGS)

test: setup data
	$(PY) -m pytest -q tests

test-slurm: setup data
	tests/slurm/run.sh

bench: setup data
	$(PY) -m fedrun.bench $(ARGS)

tensorboard: setup
	$(PY) -m tensorboard.main --logdir runs --host 127.0.0.1 --port 6006

clean:
	rm -rf runs checkpoints .pytest_cache
