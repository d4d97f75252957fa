# stowage developer front door. `just --list` shows every recipe.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List recipes.
default:
    @just --list

# Local control plane and kubelet node; stowage installed from its image with `kubectl apply -k`, provisioning a real volume.
demo: deps image control-plane
    STOWAGE_WITH_NODE=1 bash scripts/cluster.sh run -- bash scripts/demo.sh

# Everything CI checks: formatting, lints, generated files, unit and integration tests.
test: deps fmt-check clippy control-plane image
    cargo build --all-targets
    bash scripts/cluster.sh run -- bash scripts/test-in-cluster.sh
    bash scripts/check-no-leftovers.sh

# Install the host tools stowage and its tests use (mkfs.xfs, ...) if missing.
deps:
    bash scripts/install-deps.sh

# Build the stowage binary.
build:
    cargo build

# The container image for both roles, without a container engine: target/image/stowage-TAG.tar (TAG defaults to the crate version).
image TAG="": deps
    bash scripts/build-image.sh {{TAG}}

# Build (or reuse from ~/.cache/stowage) etcd, the Kubernetes binaries, the CSI mock driver, external-provisioner (for the CreateVolume parity test) and external-snapshotter's snapshot-controller and CRDs (for the snapshot tests).
control-plane:
    bash scripts/build-control-plane.sh >/dev/null
    bash scripts/build-mock-driver.sh >/dev/null
    bash scripts/build-sidecars.sh csi-provisioner >/dev/null
    bash scripts/build-snapshotter.sh >/dev/null

# A shell with KUBECONFIG pointing at a fresh local control plane; exit to tear down.
cluster: control-plane
    bash scripts/cluster.sh run -- bash -i

# Regenerate crds/ (and its copy in manifests/) from the Rust types in src/crd/.
crds:
    cargo run --quiet -- crds > crds/stowage.dev.yaml
    cp crds/stowage.dev.yaml manifests/01-crds.yaml

# Format the code.
fmt:
    cargo fmt --all

# Fail if the code is not formatted.
fmt-check:
    cargo fmt --all -- --check

# Lints, warnings as errors.
clippy:
    cargo clippy --all-targets -- -D warnings

# Benchmark (not a test): N claims provisioned and bound on a fresh control plane.
bench-provision N="100": deps control-plane
    cargo build --release --bin stowage --example bench_provision
    bash scripts/cluster.sh run -- target/release/examples/bench_provision {{N}}

# Benchmark (not a test): the controller starting on N pre-populated claims (half another driver's), then 1000 new claims, beside the same on an empty control plane.
bench-scale N="50000": deps control-plane
    cargo build --release --bin stowage --example bench_scale
    bash scripts/cluster.sh run -- target/release/examples/bench_scale {{N}}

# Benchmark (not a test): N pods, each with a fresh volume, on the real kubelet node; pod creation -> Running.
bench-pod-start N="20": deps control-plane
    cargo build --release --bin stowage --example bench_pod_start
    STOWAGE_WITH_NODE=1 bash scripts/cluster.sh run -- target/release/examples/bench_pod_start {{N}}

# The proxy backend's attach lifecycle against csi-driver-host-path (`just test` runs it against Kubernetes' CSI mock driver; the Go module proxy does not serve host-path). PLUGIN: a hostpathplugin binary.
test-proxy PLUGIN: control-plane
    cargo build --all-targets
    STOWAGE_HOSTPATHPLUGIN={{PLUGIN}} bash scripts/cluster.sh run -- bash -c 'STOWAGE_TEST_KUBECONFIG=$KUBECONFIG cargo test --test integration provisions_attaches_detaches_and_deletes_through_an_external_driver -- --nocapture'

# Benchmark (not a test): stowage vs external-provisioner + external-attacher on one control plane, against Kubernetes' CSI mock driver, or csi-driver-host-path when PLUGIN names a hostpathplugin binary.
bench-compare N PLUGIN="": deps control-plane
    cargo build --release --bin stowage --example bench_compare
    STOWAGE_SIDECARS=$(bash scripts/build-sidecars.sh) STOWAGE_MOCK_DRIVER=$(bash scripts/build-mock-driver.sh)/mock-csi-driver bash scripts/cluster.sh run -- target/release/examples/bench_compare {{N}} {{PLUGIN}}

# Benchmark (not a test): the local backend's snapshot, restore and clone of a 1 GiB volume with 512 MiB written, on xfs with reflink and on ext4: time and space each; then the same through Kubernetes (VolumeSnapshot → readyToUse, restored and cloned claims → Bound).
bench-snapshot: deps control-plane
    cargo build --release --bin stowage --example bench_snapshot
    STOWAGE_SNAPSHOTTER=$(bash scripts/build-snapshotter.sh) bash scripts/cluster.sh run -- target/release/examples/bench_snapshot

# Benchmark (not a test): PODS WaitForFirstConsumer pods of random sizes over NODES simulated nodes of random free space, with CSIStorageCapacity published and without: pods rescheduled, time to all placed and Bound.
bench-reschedule PODS="200" NODES="10": deps control-plane
    cargo build --release --bin stowage --example bench_reschedule
    bash scripts/cluster.sh run -- target/release/examples/bench_reschedule {{PODS}} {{NODES}}
