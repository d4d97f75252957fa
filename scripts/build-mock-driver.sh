#!/usr/bin/env bash
# Builds mock-csi-driver (tests/csi-mock: Kubernetes' CSI mock driver on a
# unix socket) from the Go module proxy at the versions pinned in
# tests/csi-mock/go.mod. Cached in ~/.cache/stowage/csi-mock-<key>/bin under
# a key of its own, so that it never changes build-control-plane.sh's key
# (and never rebuilds the Kubernetes binaries). Prints that directory.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

mod=$REPO_ROOT/tests/csi-mock
key=$(cat "$mod/go.mod" "$mod/main.go" "$0" | sha256sum | cut -c1-12)
bin_dir="$STOWAGE_CACHE/csi-mock-$KUBE_VERSION-$key/bin"
if [[ ! -x "$bin_dir/mock-csi-driver" ]]; then
  command -v go >/dev/null || die "Go is needed to build mock-csi-driver (https://go.dev); none on PATH"
  mkdir -p "$bin_dir"
  log "building mock-csi-driver (k8s.io/kubernetes $KUBE_VERSION test/e2e/storage/drivers/csi-test/mock)"
  (cd "$mod" && CGO_ENABLED=0 GOFLAGS=-buildvcs=false \
    go build -trimpath -ldflags "-s -w" -o "$bin_dir/mock-csi-driver.tmp" .)
  mv "$bin_dir/mock-csi-driver.tmp" "$bin_dir/mock-csi-driver"
fi
echo "$bin_dir"
