.PHONY: setup quickstart test lint bench smollm2

setup:
	bash scripts/setup.sh

quickstart: setup
	.venv/bin/posttrain run recipes/quickstart.yaml

test:
	.venv/bin/python -m pytest -q

lint:
	.venv/bin/ruff check posttrain tests bench && .venv/bin/ruff format --check posttrain tests bench

smollm2:
	PYTHON=.venv/bin/python bash scripts/get_smollm2.sh

bench:
	.venv/bin/pip install -q -e ".[bench]" torch==2.13.0 && .venv/bin/python bench/sft_vs_trl.py
