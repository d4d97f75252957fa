#!/usr/bin/env bash
# The demo, run inside `cluster.sh run` (KUBECONFIG points at a fresh local
# control plane): installs the CRDs, starts `stowage controller`, records a
# Volume and shows it. Waits for Ctrl-C when run from a terminal.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

kubectl() { "$STOWAGE_KUBE_BIN/kubectl" "$@"; }
stowage="$REPO_ROOT/target/debug/stowage"

log "installing CRDs"
"$stowage" crds | kubectl apply --server-side -f -
kubectl wait --for condition=Established --timeout 60s crd/volumes.stowage.dev

log "starting stowage controller (log: $STOWAGE_CLUSTER_DIR/logs/stowage-controller.log)"
STOWAGE_METRICS_ADDR=127.0.0.1:0 setpriv --pdeathsig TERM -- "$stowage" controller \
  > "$STOWAGE_CLUSTER_DIR/logs/stowage-controller.log" 2>&1 &
controller=$!
trap 'kill $controller 2>/dev/null; wait $controller 2>/dev/null || true' EXIT

kubectl apply -f - <<'YAML'
apiVersion: stowage.dev/v1alpha1
kind: Volume
metadata:
  name: demo
spec:
  driver: local.stowage.dev
  capacityBytes: 1073741824
  accessModes: [ReadWriteOnce]
  node: demo-node
YAML
sleep 1
kubectl get volumes.stowage.dev -o wide
kill -0 "$controller" || die "stowage controller exited; see $STOWAGE_CLUSTER_DIR/logs/stowage-controller.log"

cat <<MSG

The local control plane is up. In another shell:

  export KUBECONFIG=$KUBECONFIG
  alias kubectl=$STOWAGE_KUBE_BIN/kubectl
  kubectl get volumes.stowage.dev

Logs of every component: $STOWAGE_CLUSTER_DIR/logs/
MSG
if [[ -t 0 ]]; then
  echo "Press Ctrl-C to stop everything."
  wait "$controller"
fi
