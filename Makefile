# The two set-up commands: `make install`, then `make test`.
PYTHON ?= python3
VENV := .venv
EMOTIW := $(VENV)/bin/emotiw

.PHONY: install test nets doctor demo bench preprocess docker-test clean-venv

install:
	$(PYTHON) tools/caffe_build.py install

test:
	$(VENV)/bin/python -m pytest -q

nets:
	$(EMOTIW) nets

doctor:
	$(EMOTIW) doctor

demo:
	$(EMOTIW) demo --out demo $(ARGS)

# The reference implementations (TensorFlow mtcnn, PyTorch) live in their own environment only.
bench/.venv-ref/bin/python:
	$(PYTHON) -m venv bench/.venv-ref
	bench/.venv-ref/bin/pip install -r bench/requirements-ref.txt

bench: bench/.venv-ref/bin/python
	$(VENV)/bin/python -m bench.bench $(ARGS)

RECIPE ?= dsn
preprocess:
	@test -n "$(VIDEOS)" -a -n "$(OUT)" || { echo "usage: make preprocess VIDEOS=DIR OUT=DIR [RECIPE=dsn|sse] [ARGS='--workers 4 --lmdb']" >&2; exit 2; }
	$(EMOTIW) preprocess --videos "$(VIDEOS)" --out "$(OUT)" --recipe $(RECIPE) $(ARGS)

# Builds the CPU image (and its Debian base where it cannot be pulled) and runs doctor, preprocess
# and test inside it; needs a running Docker daemon. About 20 minutes on 2 cores, so not in `make test`.
docker-test:
	sh docker/test.sh

clean-venv:
	rm -rf $(VENV)
