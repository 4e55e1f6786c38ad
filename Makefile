# Set-up and everyday commands. Everything installs into a local virtual environment.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN = $(VENV)/bin
STAMP = $(VENV)/.skcarrot-installed

export HF_HUB_OFFLINE ?= 1

DOCS_STAMP = $(VENV)/.skcarrot-docs-installed

# Offline image data some tests and benchmarks read: OpenCV's digits sheet and Fashion-MNIST, from Debian.
DATA_PACKAGES = opencv-doc dataset-fashion-mnist

.PHONY: install data demo test docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/skcarrot demo

data:
	@dpkg -s $(DATA_PACKAGES) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get install -y -q $(DATA_PACKAGES) || { apt-get update -q && apt-get install -y -q $(DATA_PACKAGES); }; \
	  else echo "some tests read Debian's $(DATA_PACKAGES): sudo apt-get install $(DATA_PACKAGES)"; fi; }

test: $(STAMP) data
	$(BIN)/python -m pytest

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,docs]'
	touch $(DOCS_STAMP)

# Builds the HTML docs, running every gallery example; any warning fails the build.
docs: $(DOCS_STAMP)
	rm -rf docs/_build docs/generated docs/auto_examples
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache docs/_build docs/generated docs/auto_examples
