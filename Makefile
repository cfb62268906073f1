# The two commands (see README):  make demo   |   make test
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test test-fast lint setup clean base
demo: $(STAMP)
	.venv/bin/adapterhub demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q --durations=25

# The contributors' loop: everything but the tests that train or serve for real (under a minute).
test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not slow" -x

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh
	touch $(STAMP)

base: $(STAMP)
	$(PY) scripts/pretrain_base.py

clean:
	rm -rf .venv
