#!/usr/bin/env bash
# Builds the upstream CSI sidecars that benchmarks run beside `stowage`, for
# comparison, from the Go module proxy at the versions pinned in
# tests/sidecars/go.mod. Results are cached in
# ~/.cache/stowage/sidecars-<hash>/bin and reused. Prints that directory.
#
# Usage: scripts/build-sidecars.sh [NAME...]
# Builds the named binaries only (csi-provisioner, csi-attacher); all of them
# when none is named.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

mod=tests/sidecars
# name -> package; the version stamped in is the one go.mod pins for it.
declare -A packages=(
  [csi-provisioner]=github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner
  [csi-attacher]=github.com/kubernetes-csi/external-attacher/v4/cmd/csi-attacher
)
all=(csi-provisioner csi-attacher)

names=("$@")
(( ${#names[@]} )) || names=("${all[@]}")
for name in "${names[@]}"; do
  case $name in
    hostpathplugin)
      die "hostpathplugin: the Go module proxy refuses github.com/kubernetes-csi/csi-driver-host-path (403), so it cannot be built from a pinned module" ;;
  esac
  [[ -n "${packages[$name]:-}" ]] || die "unknown sidecar '$name' (known: ${all[*]})"
done

# Keyed by the pins, so changing any of them builds afresh.
pins=$(cat "$REPO_ROOT/$mod/go.mod" "$REPO_ROOT/$mod/go.sum" "$0" | sha256sum | cut -c1-12)
bin_dir="$STOWAGE_CACHE/sidecars-$pins/bin"
mkdir -p "$bin_dir"
command -v go >/dev/null || die "Go is needed to build the CSI sidecars (https://go.dev); none on PATH"

export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

for name in "${names[@]}"; do
  [[ -x "$bin_dir/$name" ]] && continue
  pkg=${packages[$name]}
  log "building $name ($pkg)"
  cd "$REPO_ROOT/$mod"
  version=$(go list -m -f '{{.Version}}' "${pkg%/cmd/*}")
  go build -trimpath -ldflags "-s -w -X main.version=$version" -o "$bin_dir/$name.tmp.$$" "$pkg"
  mv "$bin_dir/$name.tmp.$$" "$bin_dir/$name"
done
echo "$bin_dir"
