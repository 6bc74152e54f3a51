# kubekms — the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo

.PHONY: help up down clean demo test test-unit test-e2e crds check-crds lint tools cluster test-cluster

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

tools: ## Build etcd, kube-apiserver and helm from the Go module proxy (cached outside the clone)
	e2e/tools/build.sh

up: ## Start the local control plane (etcd, kube-apiserver, kubekms) and write e2e/.run/env
	e2e/up.sh

down: ## Stop everything `make up` and `make cluster` started
	e2e/down.sh
	e2e/cluster.sh down

cluster: ## A one-node cluster (kubelet, containerd, kube-proxy) with the Helm chart installed for real
	e2e/cluster.sh

test-cluster: ## The node's end-to-end tests: the chart's pods, the plugin pod serving kube-apiserver, failures
	e2e/test-cluster.sh

clean: down ## Stop everything and remove the local control plane's data
	rm -rf e2e/.run

demo: ## Run the walkthrough: a control plane with kubekms, a key, and a Secret encrypted in etcd
	e2e/demo.sh

test: ## Run the unit tests, then the end-to-end tests against a local control plane
	e2e/test.sh

crds: ## Regenerate crds/ and the chart's crds/ from the Rust types
	$(CARGO) run --quiet -- crds > crds/kubekms.yaml
	cp crds/kubekms.yaml charts/kubekms/crds/kubekms.yaml

.PHONY: chaos chaos-smoke
chaos: ## Crash consistency under load: kill -9 each component, 10 rounds (~22 min; CHAOS_ARGS="--rounds 3 --seed S")
	e2e/chaos.sh $(CHAOS_ARGS)

chaos-smoke: ## The chaos test's short run, 1 round of each kill (part of make test; ~3 min)
	e2e/chaos.sh --smoke $(CHAOS_ARGS)

.PHONY: fuzz fuzz-smoke
FUZZ_SECONDS ?= 600
FUZZ_SMOKE_SECONDS ?= 10
fuzz: ## Run every fuzz target for FUZZ_SECONDS each (default 600 s; README, "Reliability")
	fuzz/run.sh run $(FUZZ_SECONDS)

fuzz-smoke: ## Every fuzz target for FUZZ_SMOKE_SECONDS (default 10 s), so that they cannot rot
	fuzz/run.sh run $(FUZZ_SMOKE_SECONDS)

.PHONY: bench bench-smoke bench-flood
bench: ## Benchmark kubekms against the Go reference plugin and no encryption (~18 min with the flood section; BENCH_ARGS=--runs 5)
	bench/run.sh $(BENCH_ARGS)

FLOOD_SECONDS ?= 180
bench-flood: ## 16 valid key API callers alone, then under a flood of bad requests (~8 min: 2 × FLOOD_SECONDS=180 s, plus setup)
	bench/run.sh --flood $(FLOOD_SECONDS) $(BENCH_ARGS)

bench-smoke: ## The benchmark at tiny sizes, to check that it works (about a minute; measures nothing)
	bench/run.sh --smoke

lint: ## cargo fmt --check and clippy with warnings as errors
	$(CARGO) fmt --check
	$(CARGO) fmt --check --manifest-path fuzz/Cargo.toml
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --test e2e -- -D warnings
	$(CARGO) clippy --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings
