# rmgrpc: `make run` and `make test` do all set-up on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PROTOS := $(wildcard protos/rmgrpc/v1/*.proto)
PROTOC  = $(BIN)/python -m grpc_tools.protoc -Iprotos \
  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
  --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc
ARGS   ?=

.PHONY: run test test-slow proto proto-check proto-lint lint bench mutate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# Dev mode: 4 simulated nodes (a plain `rmgrpc serve` has only real ones).
run: $(STAMP)
	$(BIN)/rmgrpc serve --dev $(ARGS)

test: $(STAMP) proto-check
	$(BIN)/python -m pytest -q $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(ARGS)

# Stubs and .pyi files in generated/ come only from here; never edit them by hand.
proto: $(STAMP)
	rm -rf generated/rmgrpc
	mkdir -p generated/rmgrpc/v1
	$(PROTOC) \
	  --python_out=generated --grpc_python_out=generated \
	  --mypy_out=generated --mypy_grpc_out=generated $(PROTOS)
	printf '"""Stubs generated from protos/rmgrpc/v1 by `make proto`."""\n' > generated/rmgrpc/v1/__init__.py
	touch generated/rmgrpc/v1/py.typed

# Fails when generated/ is not what `make proto` makes from protos/.
proto-check: $(STAMP)
	@tmp=$$(mktemp -d) && mkdir -p $$tmp/rmgrpc/v1 && \
	$(PROTOC) \
	  --python_out=$$tmp --grpc_python_out=$$tmp \
	  --mypy_out=$$tmp --mypy_grpc_out=$$tmp $(PROTOS) 2>$$tmp/protoc.log || \
	  { cat $$tmp/protoc.log; rm -rf $$tmp; exit 1; }; \
	rm $$tmp/protoc.log && \
	printf '"""Stubs generated from protos/rmgrpc/v1 by `make proto`."""\n' > $$tmp/rmgrpc/v1/__init__.py && \
	touch $$tmp/rmgrpc/v1/py.typed && \
	if diff -r $$tmp/rmgrpc generated/rmgrpc >/dev/null; then rm -rf $$tmp; \
	else echo "generated/ is stale: run 'make proto' and commit it"; diff -r $$tmp/rmgrpc generated/rmgrpc | head -20; rm -rf $$tmp; exit 1; fi

# buf (from the npm registry, pinned) checks the protos against the API style guide.
BUF := $(VENV)/buf/node_modules/.bin/buf
$(BUF):
	npm install --silent --no-audit --no-fund --prefix $(VENV)/buf @bufbuild/buf@1.75.0

proto-lint: $(BUF)
	cd protos && $(abspath $(BUF)) lint

lint: $(STAMP)
	$(BIN)/ruff check src clients tests
	$(BIN)/ruff format --check src clients tests
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m tests.bench $(ARGS)

# Mutation testing of scheduler/preemption.py and scheduler/fairshare.py against the fast
# unit tests ([tool.mutmut] in pyproject.toml); `ARGS="rmgrpc.scheduler.preemption*"`
# narrows it to one module. Then `.venv/bin/mutmut results` lists the survivors.
mutate: $(STAMP)
	$(BIN)/mutmut run --max-children 2 $(ARGS)
	$(BIN)/mutmut results

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
