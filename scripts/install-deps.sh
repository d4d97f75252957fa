#!/usr/bin/env bash
# Installs the Debian packages stowage's tests use on the host (filesystem
# tools for the local backend). Does nothing when they are all present.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

need=()
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v mkfs.xfs >/dev/null || need+=(xfsprogs)
command -v losetup >/dev/null || need+=(mount)
command -v blkid >/dev/null || need+=(util-linux)
command -v setpriv >/dev/null || need+=(util-linux)
command -v python3 >/dev/null || need+=(python3)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
# The test node: container runtime, CNI plugins, and busybox for pod images.
command -v containerd >/dev/null || need+=(containerd)
command -v runc >/dev/null || need+=(runc)
[[ -x /usr/lib/cni/bridge ]] || need+=(containernetworking-plugins)
[[ -x /usr/bin/busybox ]] || need+=(busybox-static)
# The container image (scripts/build-image.sh): Debian's packages unpacked by
# mmdebstrap, libraries found with readelf.
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v readelf >/dev/null || need+=(binutils)
((${#need[@]})) || exit 0

[[ $(id -u) == 0 ]] || die "missing packages ${need[*]}; install them (apt-get install ${need[*]}) or run as root"
log "installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
