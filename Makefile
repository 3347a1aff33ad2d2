# Two commands do everything on a fresh clone: `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test test-fast lint bench clean data

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) train.py

test: setup
	bash scripts/run_tests.sh

test-fast: setup
	$(PY) -m pytest -m "not slow" -q

lint: setup
	$(PY) -m ruff check src tests scripts train.py eval.py

# Speed table vs plain references (docs/benchmarks.md); `make bench BENCH_ARGS="--quick --rows 1,3"`.
bench: setup
	$(PY) -m pip install --quiet --no-deps mambapy==1.2.0
	$(PY) scripts/bench.py $(BENCH_ARGS)

clean:
	rm -rf outputs .pytest_cache

# Fashion-MNIST for data=smnist and the QS4D studies (Debian package; needs root).
data:
	apt-get install -y dataset-fashion-mnist
