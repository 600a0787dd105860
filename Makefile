# Two entry points (see README): `make repro` runs the main job, `make test` runs the suite.
# Both create .venv on first use and reinstall when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch first: its wheel decides the CUDA/CPU flavour; override on GPU machines if needed.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install repro paper imagenet-lt places-lt test perf clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

repro: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro

# The paper profile (CUB-200, miniImageNet, CIFAR-FS): a GPU machine with internet.
paper: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro profiles/paper/dvc.yaml

# The long-tail profiles (ImageNet-LT, Places-LT): a GPU machine with internet and a local copy of
# the source images (image_roots in profiles/<name>/params.yaml).
imagenet-lt: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro profiles/imagenet-lt/dvc.yaml

places-lt: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro profiles/places-lt/dvc.yaml

# One intra-op thread: the tests run tiny models, for which thread hand-off costs more than it
# gains (10-100x slower on a busy 2-core machine); a single process beat pytest-xdist -n 2.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest

# Speed/memory benchmarks (JSON figures in results/perf/), outside the default dvc repro.
perf: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro profiles/perf/dvc.yaml

clean-venv:
	rm -rf $(VENV)
