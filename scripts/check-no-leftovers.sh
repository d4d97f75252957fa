#!/usr/bin/env bash
# Fails if a control-plane or test-node process we started is still running.
# Control planes that the test harness started itself (`cluster.sh serve`)
# are torn down when the test process exits, which can take a few seconds
# more than the test run itself: wait up to 30s for them.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

pattern="$STOWAGE_CACHE/.*/bin/(etcd|kube-apiserver|kube-controller-manager|kube-scheduler|kubelet)|containerd --config .*/node/containerd.toml|containerd-shim.*/node/containerd.sock"
for _ in $(seq 60); do
  pgrep -f "$pattern" >/dev/null || { echo "no control-plane process left running"; exit 0; }
  sleep 0.5
done
printf 'error: control-plane processes left running:\n%s\n' "$(pgrep -a -f "$pattern")" >&2
exit 1
