# Sluice: the two commands a new machine needs are `make demo` and `make test` (as root).

SWIFT ?= swift
APT_PACKAGES = iptables ipset conntrack iproute2 user-mode-linux kmod ipvsadm libipset-dev libnetfilter-conntrack-dev libnftables-dev nftables python3 openssl
BIN = .build/debug/sluice
RELEASE_SCRATCH = .build-release
RELEASE_BIN = $(RELEASE_SCRATCH)/release/sluice
PYTHON = /usr/bin/python3
TEST_BIN = .build/debug/SluicePackageTests.xctest
# How many host tests run at once. Unbounded, every test starts at once and the cooperative
# thread pool (one thread per core) runs CPU-bound tests to their end while tests that wait on
# a socket or a timer queue behind all of them: on 2 cores an API-source test waited 35 s for
# its first list. A bounded width keeps the queue short; the run takes no longer.
HOST_TEST_WIDTH ?= 8
# Test suites that need IPVS and dummy devices: they run inside user-mode Linux.
UML_TESTS = IPVSKernelTests|IPVSClientKernelTests|ExplainIPVSKernelTests

.PHONY: deps build demo test check-imports uml-test unit-test kernel-test compile-example clean release bench bench-smoke soak

# Install the Debian packages the build and the tests need (once per machine).
deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null; \
	fi

build: deps
	$(SWIFT) build --build-tests

# Real traffic through a Service address in throw-away network namespaces.
demo: build
	SLUICE_BIN=$(BIN) bash scripts/demo.sh

# Every test: first the cheap check that Package.swift declares every module a target
# imports, then golden, model, partial sync, and real-kernel tests in namespaces: the IPVS
# kernel tests inside user-mode Linux (one guest boot), then the benchmark harness at smoke
# scale (it fails when a case loses a number; in CI every mode must be measured), then the
# host suite last so its summary is the last line printed.
test: check-imports uml-test
	cd benchmarks && $(PYTHON) -m unittest sluicebench.test_payload
	@if [ "$$(id -u)" = 0 ]; then \
		$(MAKE) --no-print-directory bench-smoke BENCH_FLAGS="$(if $(filter true,$(CI)),--strict)"; \
	else \
		echo "bench-smoke skipped: not root (it needs network namespaces and iptables)"; \
	fi
	SLUICE_BIN=$(abspath $(BIN)) $(TEST_BIN) --testing-library swift-testing --experimental-maximum-parallelization-width $(HOST_TEST_WIDTH)

# Package.swift declares what each target imports (docs/architecture.md); no build needed.
check-imports:
	$(PYTHON) scripts/check-target-imports.py

# Only the IPVS kernel tests, inside user-mode Linux, one suite at a time: the guest has one
# CPU, and suites sending traffic side by side there made UDP clients retry and skew counts.
uml-test: build
	SLUICE_BIN=$(abspath $(BIN)) scripts/uml-run.sh $(abspath $(TEST_BIN)) --testing-library swift-testing --no-parallel --filter '$(UML_TESTS)'

compile-example: build
	$(BIN) compile --manifests examples --hostname-override demo-node --node-ip 192.168.50.1 --cluster-cidr 10.244.0.0/16

# A release build in its own scratch directory (the benchmarks measure this one).
# sluice and, beside it, the benchmark's compile helper (not part of the product).
release: deps
	$(SWIFT) build -c release --scratch-path $(RELEASE_SCRATCH) --product sluice
	$(SWIFT) build -c release --scratch-path $(RELEASE_SCRATCH) --product sluice-bench-compile

# The full benchmark (as root; about 30 minutes on 2 cores): release build, every mode and
# scenario, report and plots in benchmarks/results/ (see benchmarks/README.md).
bench: release
	$(PYTHON) benchmarks/bench.py --plan full --sluice $(RELEASE_BIN) --out benchmarks/results

# The same harness at S <= 100 with few repetitions, to keep it working (a few minutes). It
# measures the debug build `make test` already made (a release build alone takes ~6 minutes);
# the report goes to benchmarks/results/smoke/ (not committed).
bench-smoke: build
	$(PYTHON) benchmarks/bench.py --plan smoke --sluice $(or $(SLUICE),$(BIN)) --out benchmarks/results/smoke $(BENCH_FLAGS)

# Soak (as root; not part of `make test`): 30 minutes of endpoint churn against the release
# build, sampling RSS, descriptors and sync latency; SOAK_SECONDS shortens it. Report and plot
# in benchmarks/results/soak/.
soak: release
	$(PYTHON) benchmarks/soak.py --sluice $(RELEASE_BIN) --duration $(or $(SOAK_SECONDS),1800) --out benchmarks/results/soak

clean:
	rm -rf .build $(RELEASE_SCRATCH)
