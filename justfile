# atelier recipes. `scripts/bootstrap` installs just itself into .tools/bin.
set shell := ["bash", "-euo", "pipefail", "-c"]

default:
    @just --list

# Install the pinned tools (nats-server, SeaweedFS, just, nats-py) into .tools/
bootstrap:
    scripts/bootstrap

# Release build of every binary
build:
    cargo build --release --workspace --bins

# The main job: the demo pipeline on the embedded default
demo:
    scripts/demo

# Every test, against real servers
test:
    scripts/test

# Benchmarks: bus+store overhead (no-op handler, 1 and 4 replicas); reading a KV bucket; eval-captions beside pycocoevalcap
bench: bootstrap
    cargo bench -p atelier-e2e --bench bus
    cargo bench -p atelier-e2e --bench kv_scan
    .tools/bin/pip install --quiet --no-deps pycocoevalcap==1.2 && .tools/bin/pip install --quiet numpy
    cargo bench -p atelier-caption-eval --bench eval

# The ANN index beside faiss HNSW; the augmenter's resize/crop beside Pillow
# The diffusion engine (libtorch through tch) side by side with PyTorch from Python: ~15 min
bench-engines: bootstrap
    scripts/bench-engines

bench-retrieval: bootstrap
    scripts/bench-ann
    scripts/bench-augment

# Embedded all-in-one (gateway + services in one process)
embedded *ARGS: bootstrap build
    target/release/atelier up {{ARGS}}

# Local cluster: nats-server + SeaweedFS S3 + gateway + each service as its own process
up: bootstrap build
    scripts/cluster up

# Fresh credentials for the compose cluster (infra/docker/.env, mode 600; compose refuses to start without them)
cluster-env: build
    scripts/cluster compose-env

# Stop the local cluster
down:
    scripts/cluster down

# Which cluster processes are running
status:
    scripts/cluster status

# The reliability drills with their figures (small counts; `just drill --full` for the full ones)
drill *ARGS:
    scripts/drill {{ARGS}}

# Lints as CI runs them
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
