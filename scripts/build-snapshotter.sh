#!/usr/bin/env bash
# Builds external-snapshotter's snapshot-controller (the cluster add-on the
# snapshot tests run) and csi-snapshotter (the sidecar benchmarks compare
# with) from the Go module proxy at the versions pinned in
# tests/snapshotter/go.mod, and copies that release's VolumeSnapshot CRDs
# beside them, with the ReferenceGrant CRD of the Gateway API release pinned
# there (cross-namespace data sources). Cached in
# ~/.cache/stowage/snapshotter-<hash>/{bin,crd} and reused. Prints that
# directory.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

mod=$REPO_ROOT/tests/snapshotter
pins=$(cat "$mod/go.mod" "$mod/go.sum" "$0" | sha256sum | cut -c1-12)
dir="$STOWAGE_CACHE/snapshotter-$pins"
command -v go >/dev/null || die "Go is needed to build external-snapshotter (https://go.dev); none on PATH"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false
cd "$mod"
mkdir -p "$dir/bin" "$dir/crd"
for name in snapshot-controller csi-snapshotter; do
  [[ -x "$dir/bin/$name" ]] && continue
  pkg=github.com/kubernetes-csi/external-snapshotter/v8/cmd/$name
  version=$(go list -m -f '{{.Version}}' github.com/kubernetes-csi/external-snapshotter/v8)
  log "building $name $version"
  go build -trimpath -ldflags "-s -w -X main.version=$version" -o "$dir/bin/$name.tmp.$$" "$pkg"
  mv "$dir/bin/$name.tmp.$$" "$dir/bin/$name"
done
if [[ ! -s "$dir/crd/volumesnapshots.yaml" ]]; then
  client=$(go list -m -f '{{.Dir}}' github.com/kubernetes-csi/external-snapshotter/client/v8)
  [[ -n "$client" ]] || die "could not find the external-snapshotter client module"
  for kind in volumesnapshotclasses volumesnapshotcontents volumesnapshots; do
    cp "$client/config/crd/snapshot.storage.k8s.io_$kind.yaml" "$dir/crd/$kind.yaml.tmp"
    mv "$dir/crd/$kind.yaml.tmp" "$dir/crd/$kind.yaml"
  done
fi
if [[ ! -s "$dir/crd/referencegrants.yaml" ]]; then
  go mod download sigs.k8s.io/gateway-api
  gateway=$(go list -m -f '{{.Dir}}' sigs.k8s.io/gateway-api)
  [[ -n "$gateway" ]] || die "could not find the Gateway API module"
  cp "$gateway/config/crd/standard/gateway.networking.k8s.io_referencegrants.yaml" "$dir/crd/referencegrants.yaml.tmp"
  mv "$dir/crd/referencegrants.yaml.tmp" "$dir/crd/referencegrants.yaml"
fi
echo "$dir"
