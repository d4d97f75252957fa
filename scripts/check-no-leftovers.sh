#!/usr/bin/env bash
# Fails if a control-plane process started from our cache is still running.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
leftover=$(pgrep -a -f "$STOWAGE_CACHE/.*/bin/(etcd|kube-apiserver|kube-controller-manager|kube-scheduler|kubelet)" || true)
if [[ -n "$leftover" ]]; then
  printf 'error: control-plane processes left running:\n%s\n' "$leftover" >&2
  exit 1
fi
echo "no control-plane process left running"
