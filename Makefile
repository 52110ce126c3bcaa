# Frequent commands. `make setup` once; the others assume .venv exists.
.PHONY: setup quickstart test test-unit test-dist bench bench-mor clean

setup:
	bash scripts/setup.sh

quickstart:
	bash scripts/quickstart.sh

test:
	bash scripts/test.sh

test-unit:
	.venv/bin/python -m pytest tests/unit -q

test-dist:
	OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/distributed -q --durations=10

bench:
	OMP_NUM_THREADS=1 .venv/bin/python tools/bench_moe.py

bench-mor:
	OMP_NUM_THREADS=1 .venv/bin/python tools/bench_mor.py

clean:
	rm -rf runs .pytest_cache
