# make run    set up, then run the gateway on its embedded defaults (config.example.yaml)
# make test   set up, then run the whole test suite
# make bench  set up, then run the benchmarks in bench/ (each against Postfix where it has one)
# make lint   set up, then run the pinned linters (ruff format, ruff check, mypy --strict)
# make hostile  set up, then run the full hostile battery (about 3,100 sessions)
.PHONY: setup run test bench lint hostile

setup:
	sh scripts/setup.sh

run: setup
	.venv/bin/sealgate run --config config.example.yaml

test: setup
	.venv/bin/python -m pytest

bench:
	sh scripts/setup.sh
	.venv/bin/python bench/accept.py
	.venv/bin/python bench/relay.py
	.venv/bin/python bench/relay_tls.py
	.venv/bin/python bench/world.py
	.venv/bin/python bench/policy.py
	.venv/bin/python bench/encrypt.py
	.venv/bin/python bench/archive.py
	.venv/bin/python bench/journal.py
	.venv/bin/python bench/cluster.py
	.venv/bin/python bench/integrations.py
	.venv/bin/python bench/console.py
	.venv/bin/python bench/binding.py
	.venv/bin/python bench/backlog.py

hostile: setup
	.venv/bin/python bench/hostile.py --markdown

lint: setup
	.venv/bin/ruff format --check gateway tests bench
	.venv/bin/ruff check gateway tests bench
	.venv/bin/mypy
