# Two commands for a fresh Debian machine (as root): `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup system criu pypy venv demo test unit chaos fuzz bench clean install box box-clean vagrant-up vagrant-down test-vagrant

setup: system criu pypy venv

system:
	bash scripts/setup-system.sh

criu: system
	bash scripts/install-criu.sh

# PyPy for long simulations (migrctl sim --interpreter); nothing else uses it.
pypy: system
	bash scripts/install-pypy.sh

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

# The chaos test for longer, with a fresh seed (printed; MIGRD_CHAOS_SEED=N replays a schedule).
# Its summary goes to chaos-report.json. `make test` runs it with 16 rounds and a fixed seed.
CHAOS_ROUNDS ?= 60
CHAOS_SEED   ?= $(shell date +%s)
chaos: venv
	MIGRD_CHAOS_SEED=$(CHAOS_SEED) MIGRD_CHAOS_ROUNDS=$(CHAOS_ROUNDS) MIGRD_CHAOS_REPORT=chaos-report.json \
		$(PY) -m pytest -v -s tests/test_chaos.py

# The fuzz tests with many more random examples than `make test` gives them (minutes).
fuzz: venv
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -v -m fuzz

# Installs the systemd unit (pointing at this checkout's venv) and, only if absent, the example
# config. Starts nothing: `systemctl daemon-reload && systemctl enable --now migrd` is yours.
UNIT_DIR ?= /etc/systemd/system
CONF_DIR ?= /etc/migrd
install: venv
	install -d -m 0755 $(UNIT_DIR)
	sed 's|^ExecStart=/usr/local/bin/migrd |ExecStart=$(abspath $(VENV))/bin/migrd |' systemd/migrd.service > $(UNIT_DIR)/migrd.service
	chmod 0644 $(UNIT_DIR)/migrd.service
	@echo "install: wrote $(UNIT_DIR)/migrd.service (ExecStart=$(abspath $(VENV))/bin/migrd run)"
	install -d -m 0700 $(CONF_DIR)
	@if [ -e $(CONF_DIR)/migrd.yaml ]; then echo "install: kept existing $(CONF_DIR)/migrd.yaml"; \
	else install -m 0600 configs/migrd.yaml $(CONF_DIR)/migrd.yaml && echo "install: wrote $(CONF_DIR)/migrd.yaml"; fi
	@echo "install: nothing started; run: systemctl daemon-reload && systemctl enable --now migrd"

# The Vagrant multi-VM bed on libvirt + QEMU (see README, "The Vagrant bed"). Slow; not in `test`.
# box: Debian trixie built here with debootstrap (cached by recipe hash) holding migrd's
# dependencies and the CRIU `make criu` proved. vagrant-down removes all that vagrant-up made
# (the box stays cached in /var/lib/migrd-vagrant; `make box-clean` removes it).
MIGRD_VMS ?= 2
export MIGRD_VMS
box: criu
	bash scripts/build-box.sh

vagrant-up: criu
	bash scripts/vagrant-bed.sh up

vagrant-down:
	bash scripts/vagrant-bed.sh down

# Brings the VMs up, runs the migrations between them, and always tears everything down.
test-vagrant: venv
	bash scripts/vagrant-bed.sh up && MIGRD_VAGRANT=1 $(PY) -m pytest -v -s tests/test_vagrant_boot.py; \
		rc=$$?; bash scripts/vagrant-bed.sh down; exit $$rc

box-clean:
	VAGRANT_HOME=/var/lib/migrd-vagrant/home vagrant box remove --force migrd/trixie || true
	rm -rf /var/lib/migrd-vagrant

clean:
	rm -rf $(VENV) build *.egg-info
