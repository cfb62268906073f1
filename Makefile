# The two commands (see README):  make demo   |   make test
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test lint setup clean base
demo: $(STAMP)
	.venv/bin/adapterhub demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh
	touch $(STAMP)

base: $(STAMP)
	$(PY) scripts/pretrain_base.py

clean:
	rm -rf .venv
