# Two entry points for a newcomer: `make demo` and `make test`.
# Both create .venv when it is missing and install featcache into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.featcache-installed
# pytest processes; each test file runs whole in one of them (session fixtures are built once per process).
TEST_WORKERS ?= 2

.PHONY: demo test bench clean browser

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/featcache demo --out runs/demo

# The HTML report's rendering test needs a headless browser: Debian's chromium,
# installed here when this is a root shell with apt; the test skips loudly otherwise.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "chromium could not be installed: the HTML rendering test will be skipped"

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(BIN)/python bench/extract_vs_forward.py
	$(BIN)/python bench/heads_sweep.py

clean:
	rm -rf runs .pytest_cache
