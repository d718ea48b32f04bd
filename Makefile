# The two set-up commands: `make install`, then `make test`.
PYTHON ?= python3
VENV := .venv
EMOTIW := $(VENV)/bin/emotiw

.PHONY: install test nets doctor clean-venv

install:
	$(PYTHON) -m emotiw.caffe_build install

test:
	$(VENV)/bin/python -m pytest -q

nets:
	$(EMOTIW) nets

doctor:
	$(EMOTIW) doctor

clean-venv:
	rm -rf $(VENV)
