# Two commands do all the set-up: `make demo` serves query-by-image over a demo index, `make test` runs the suite.
# `make test-image` builds the Docker image and runs it (buildah, as root; no Docker engine needed).
.PHONY: demo test test-image lint bench-index bench-service

demo:
	scripts/setup.sh
	.venv/bin/retrieval demo

test:
	scripts/setup.sh --test
	.venv/bin/python -m pytest -q

test-image:
	scripts/setup.sh --image
	.venv/bin/python -m pytest -q -s tests/docker_image.py

lint:
	.venv/bin/ruff check .
