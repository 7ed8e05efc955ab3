# Two commands do all the set-up: `make demo` serves query-by-image over a demo index, `make test` runs the suite.
.PHONY: demo test lint bench-index bench-service

demo:
	scripts/setup.sh
	.venv/bin/retrieval demo

test:
	scripts/setup.sh --test
	.venv/bin/python -m pytest -q

lint:
	.venv/bin/ruff check .
