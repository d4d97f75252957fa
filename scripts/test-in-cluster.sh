#!/usr/bin/env bash
# Runs the whole cargo test suite against the control plane that
# cluster.sh run started (KUBECONFIG points at it).
set -euo pipefail
export STOWAGE_TEST_KUBECONFIG=${KUBECONFIG:?run me through scripts/cluster.sh run}
exec cargo test --all-targets --no-fail-fast -- --test-threads "${STOWAGE_TEST_THREADS:-4}"
