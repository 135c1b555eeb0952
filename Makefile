# The two set-up commands of the README: `make quickstart` and `make test`.
# Each creates .venv on first use, installs everything (torch first, pinned by
# constraints.txt, so pip never pulls a second copy), then runs.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rkd-installed

.PHONY: install quickstart test lint ucas50 aid aid-resolution aid-edge clean-runs openmmlab test-openmmlab

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

aid-resolution: install
	$(BIN)/rkd search examples/aid_resolution.yaml

aid-edge: install
	$(BIN)/rkd search examples/aid_edge.yaml

test: install
	$(BIN)/python -m pytest

# ruff: the lint rules and the format in pyproject.toml ([tool.ruff]); CI runs it before the tests.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean-runs:
	rm -rf runs

# --- OpenMMLab adapter (model kind openmmlab): its own environment, never beside `make test` ---
# .venv-openmmlab is a venv layered on .venv (a .pth file adds .venv's site-packages, its own
# .pth files included, so torch and rkd are not installed twice) that adds mmengine, mmcv, mmdet and mmrotate. mmcv has no wheel
# for this torch: it is built from source ONCE (7-16 min on 2 cores) with its C++ standard raised
# to C++20 (torch 2.14's headers need it) and the wheel kept in $(MMCV_WHEELS) for later runs.
OMM         := .venv-openmmlab
OMM_STAMP   := $(OMM)/.rkd-openmmlab
MMCV_WHEELS ?= $(HOME)/.cache/rkd/wheels
MM_PINS     := mmengine==0.10.7 mmdet==3.3.0 mmrotate==1.0.0rc1

$(OMM_STAMP): $(STAMP)
	$(PYTHON) -m venv $(OMM)
	$(BIN)/python -c "import sysconfig; print('import site; site.addsitedir(%r)' % sysconfig.get_paths()['purelib'])" > \
	  "$$($(OMM)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/rkd-base-venv.pth"
	$(OMM)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt "setuptools<81" wheel ninja mmengine==0.10.7
	@mkdir -p $(MMCV_WHEELS)
	@if ! ls $(MMCV_WHEELS)/mmcv-2.1.0-*.whl >/dev/null 2>&1; then \
	  echo "building mmcv 2.1.0 from source (once; the wheel goes to $(MMCV_WHEELS))"; \
	  tmp=$$(mktemp -d) && \
	  $(OMM)/bin/pip download --quiet --no-deps --no-binary :all: --no-build-isolation mmcv==2.1.0 -d $$tmp && \
	  tar xzf $$tmp/mmcv-2.1.0.tar.gz -C $$tmp && \
	  sed -i "s/\['-std=c++17'\]/['-std=c++20']/" $$tmp/mmcv-2.1.0/setup.py && \
	  MMCV_WITH_OPS=1 MAX_JOBS=2 FORCE_CUDA=0 $(OMM)/bin/pip wheel --quiet --no-build-isolation --no-deps \
	    $$tmp/mmcv-2.1.0 -w $(MMCV_WHEELS) && rm -rf $$tmp; \
	fi
	$(OMM)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt $(MMCV_WHEELS)/mmcv-2.1.0-*.whl $(MM_PINS)
	touch $(OMM_STAMP)

openmmlab: $(OMM_STAMP)

test-openmmlab: openmmlab
	$(OMM)/bin/python -m pytest -m openmmlab tests/test_openmmlab.py
