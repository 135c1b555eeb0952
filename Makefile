# The two set-up commands of the README: `make quickstart` and `make test`.
# Each creates .venv on first use, installs everything (torch first, pinned by
# constraints.txt, so pip never pulls a second copy), then runs.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rkd-installed

.PHONY: install quickstart test ucas50 aid clean-runs

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt torch torchvision
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test,pretrained,export]"
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(BIN)/rkd search examples/quickstart.yaml

ucas50: install
	$(BIN)/rkd search examples/ucas50.yaml

aid: install
	$(BIN)/rkd search examples/aid.yaml

test: install
	$(BIN)/python -m pytest

clean-runs:
	rm -rf runs
