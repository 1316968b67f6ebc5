# chatd: `make run` starts the daemon, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test test-all fuzz mutate lint fmt clean bench bench-quick bench-profile install uninstall test-system

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,dev]'
	touch $(STAMP)

# The control socket, the bans and the history go under .run/ (created by chatd), so
# `make run` works as root and as an ordinary user where /run/chatd and /var/lib/chatd do
# not exist or are not writable.  It prints how to reach it with chatctl.  LISTEN=HOST:PORT (several,
# space-separated) listens there instead of etc/chatd.yaml's 127.0.0.1:1234.
LISTEN ?=
run: $(STAMP)
	@echo "make run: chatctl for this chatd: CHATD_SOCKET=$(CURDIR)/.run/admin.sock $(BIN)/chatctl list"
	$(BIN)/chatd --config etc/chatd.yaml \
		--control-socket .run/admin.sock --state-file .run/state.json \
		--history-file .run/history.sqlite3 \
		$(foreach address,$(LISTEN),--listen $(address))

test: $(STAMP)
	$(BIN)/python -m pytest

# Everything, the slow tests included (CI runs this too).
test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

# Fuzzing: the room's state machine and a connection's raw byte stream, at
# length (the default suite runs a few dozen examples of each).
FUZZ_EXAMPLES ?= 3000
fuzz: $(STAMP)
	CHATD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -m '' --timeout=0 -s \
		tests/test_room_stateful.py tests/test_fuzz_connection.py

# Mutation testing of wire and core against their own fast tests (mutmut; not in
# `make test`: about 15 minutes on two cores).  Fails below 90% of mutants killed.
MUTATE_JOBS ?= 2
mutate: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[mutate]'
	rm -rf mutants
	$(BIN)/mutmut run --max-children $(MUTATE_JOBS) >/dev/null
	$(BIN)/mutmut export-cicd-stats >/dev/null
	$(BIN)/python tools/mutation_report.py

# The benchmark of issue 7 (see bench/chatbench.py and README "Performance").
bench: $(STAMP)
	$(BIN)/python bench/chatbench.py

bench-quick: $(STAMP)
	$(BIN)/python bench/chatbench.py --quick

# One round with chatd sampled by py-spy; collapsed stacks in bench/results/profile/.
bench-profile: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(BIN)/python bench/chatbench.py --quick --profile bench/results/profile

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Install for the whole system: `sudo make install` (PREFIX=/usr/local) or a
# package build with DESTDIR.  The chatd package goes to a private directory,
# LIBDIR/chatd, with its dependencies installed there by pip (PIP_ARGS passes
# options, say --no-index --find-links DIR; INSTALL_DEPS=no leaves them to the
# system's packages: python3-yaml, python3-structlog, python3-daemon, python3-h11,
# python3-prometheus-client).
# Small wrappers in BINDIR run the commands with INSTALL_PYTHON.
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib
MANDIR ?= $(PREFIX)/share/man
SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
INSTALL_PYTHON ?= /usr/bin/python3
INSTALL_DEPS ?= yes
PIP_ARGS ?=
PKGDIR := $(LIBDIR)/chatd
# name:module:function for each command in pyproject.toml's [project.scripts]
SCRIPTS := $(shell sed -n '/^\[project.scripts\]/,/^\[/s/^\([a-z][a-z-]*\) *= *"\([a-z_.]*\):\([a-z_]*\)"/\1:\2:\3/p' pyproject.toml)
MAN_PAGES := $(wildcard man/*.[1-8])
UNITS := systemd/chatd.service systemd/chatd.socket

install:
	test -x $(INSTALL_PYTHON) || { echo "make install: no $(INSTALL_PYTHON); set INSTALL_PYTHON" >&2; exit 1; }
	rm -rf '$(DESTDIR)$(PKGDIR)'
	install -d '$(DESTDIR)$(PKGDIR)/chatd'
	cd chatd && find . -name '*.py' -exec install -D -m 0644 '{}' '$(DESTDIR)$(PKGDIR)/chatd/{}' ';'
ifeq ($(INSTALL_DEPS),yes)
	rm -rf build/install-venv
	mkdir -p build
	$(INSTALL_PYTHON) -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > build/requirements.txt
	$(INSTALL_PYTHON) -m venv build/install-venv
	build/install-venv/bin/python -m pip install --quiet --disable-pip-version-check \
		--no-compile --target '$(DESTDIR)$(PKGDIR)' $(PIP_ARGS) -r build/requirements.txt
	rm -rf '$(DESTDIR)$(PKGDIR)/bin' build/install-venv
endif
	$(INSTALL_PYTHON) -m compileall -q $(if $(DESTDIR),-s '$(DESTDIR)' -p /) '$(DESTDIR)$(PKGDIR)'
	install -d '$(DESTDIR)$(BINDIR)'
	for s in $(SCRIPTS); do \
		name=$${s%%:*}; rest=$${s#*:}; module=$${rest%%:*}; func=$${rest#*:}; \
		printf '#!%s -I\n# %s, installed by make install\nimport sys\n\nsys.path.insert(0, "%s")\nfrom %s import %s\n\nsys.exit(%s())\n' \
			'$(INSTALL_PYTHON)' "$$name" '$(PKGDIR)' "$$module" "$$func" "$$func" > '$(DESTDIR)$(BINDIR)'/"$$name"; \
		chmod 0755 '$(DESTDIR)$(BINDIR)'/"$$name"; \
	done
	install -d '$(DESTDIR)$(UNITDIR)'
	for u in $(UNITS); do \
		sed 's|@BINDIR@|$(BINDIR)|g' "$$u" > '$(DESTDIR)$(UNITDIR)'/"$${u##*/}"; \
		chmod 0644 '$(DESTDIR)$(UNITDIR)'/"$${u##*/}"; \
	done
	install -D -m 0644 systemd/chatd.sysusers '$(DESTDIR)$(SYSUSERSDIR)/chatd.conf'
	for m in $(MAN_PAGES); do \
		install -D -m 0644 "$$m" '$(DESTDIR)$(MANDIR)'/man"$${m##*.}"/"$${m##*/}"; \
	done
	if [ -e '$(DESTDIR)$(SYSCONFDIR)/chatd/chatd.yaml' ]; then \
		echo "kept the existing $(SYSCONFDIR)/chatd/chatd.yaml"; \
	else \
		install -D -m 0644 etc/chatd.yaml '$(DESTDIR)$(SYSCONFDIR)/chatd/chatd.yaml'; \
	fi
# The admin group, which chatd.service needs, is created on the real root only
# (a package runs systemd-sysusers when it is installed).
ifeq ($(DESTDIR),)
	if command -v systemd-sysusers >/dev/null; then \
		systemd-sysusers '$(SYSUSERSDIR)/chatd.conf'; \
	elif ! getent group chatd-admin >/dev/null; then \
		groupadd --system chatd-admin; \
	fi
endif
	@echo "installed chatd in $(DESTDIR)$(PREFIX); next: systemctl daemon-reload && systemctl enable --now chatd"

# Removes what install put there; the config only if it is unchanged.  The
# group chatd-admin stays (files may belong to it; groupdel removes it).
uninstall:
	rm -rf '$(DESTDIR)$(PKGDIR)'
	for s in $(SCRIPTS); do rm -f '$(DESTDIR)$(BINDIR)'/"$${s%%:*}"; done
	for u in $(UNITS); do rm -f '$(DESTDIR)$(UNITDIR)'/"$${u##*/}"; done
	rm -f '$(DESTDIR)$(SYSUSERSDIR)/chatd.conf'
	for m in $(MAN_PAGES); do rm -f '$(DESTDIR)$(MANDIR)'/man"$${m##*.}"/"$${m##*/}"; done
	if cmp -s etc/chatd.yaml '$(DESTDIR)$(SYSCONFDIR)/chatd/chatd.yaml'; then \
		rm -f '$(DESTDIR)$(SYSCONFDIR)/chatd/chatd.yaml'; \
		rmdir '$(DESTDIR)$(SYSCONFDIR)/chatd' 2>/dev/null || true; \
	elif [ -e '$(DESTDIR)$(SYSCONFDIR)/chatd/chatd.yaml' ]; then \
		echo "kept $(SYSCONFDIR)/chatd/chatd.yaml: it was changed"; \
	fi

# chatd under a real systemd in a container (root, systemd-nspawn, debootstrap;
# skips, saying why, without them).  See tests/system/run.sh.
test-system: $(STAMP)
	tests/system/run.sh

clean:
	rm -rf $(VENV) .run build dist mutants *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
