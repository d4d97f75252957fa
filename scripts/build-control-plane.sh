#!/usr/bin/env bash
# Builds the Kubernetes and etcd binaries the local control plane runs, and
# csi-sanity, from
# the Go module proxy at the versions pinned in scripts/lib.sh and the Go
# modules under tests/cluster/. Results are cached in
# ~/.cache/stowage/kube-<version>/bin and reused. Prints that directory.
#
# KUBEBUILDER_ASSETS, when it points at a directory holding a binary we need
# (etcd, kube-apiserver, kubectl, ...), is used for that binary instead.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

# Keyed by the pins, so changing any of them builds afresh.
pins=$(cat "$REPO_ROOT"/tests/cluster/go.mod "$REPO_ROOT"/tests/cluster/*/go.mod "$0" | sha256sum | cut -c1-12)
bin_dir="$STOWAGE_CACHE/kube-$KUBE_VERSION-etcd-$ETCD_VERSION-$pins/bin"
mkdir -p "$bin_dir"
command -v go >/dev/null || die "Go is needed to build the control plane (https://go.dev); none on PATH"

export CGO_ENABLED=0 GOFLAGS=-buildvcs=false
minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
kube_ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION"

provide() { # name, go module dir, package, ldflags
  local name=$1 dir=$2 pkg=$3 ldflags=$4
  if [[ -x "$bin_dir/$name" ]]; then return; fi
  if [[ -n "${KUBEBUILDER_ASSETS:-}" && -x "$KUBEBUILDER_ASSETS/$name" ]]; then
    ln -sf "$KUBEBUILDER_ASSETS/$name" "$bin_dir/$name"
    log "using $name from KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
    return
  fi
  log "building $name ($pkg)"
  (cd "$REPO_ROOT/$dir" && go build -trimpath -ldflags "$ldflags" -o "$bin_dir/$name.tmp" "$pkg")
  mv "$bin_dir/$name.tmp" "$bin_dir/$name"
}

provide etcd tests/cluster/etcd go.etcd.io/etcd/server/v3 "-s -w"
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet; do
  provide "$cmd" tests/cluster "k8s.io/kubernetes/cmd/$cmd" "$kube_ldflags"
done
provide csi-sanity tests/cluster/csi-sanity github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity "-s -w"
echo "$bin_dir"
