# Two commands for a fresh Debian machine (as root): `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup system criu venv demo test unit bench clean

setup: system criu venv

system:
	bash scripts/setup-system.sh

criu: system
	bash scripts/install-criu.sh

# Reinstall only when the project metadata changes.
$(STAMP): pyproject.toml
	@echo "setup: creating $(VENV) and installing migrd[test]" >&2
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: system $(STAMP)

demo: setup
	$(VENV)/bin/migrctl demo

test: setup
	$(PY) -m pytest -v

unit: venv
	$(PY) -m pytest -v -m 'not root'

clean:
	rm -rf $(VENV) build *.egg-info
