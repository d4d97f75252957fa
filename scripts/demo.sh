#!/usr/bin/env bash
# The demo, run inside `cluster.sh run` (KUBECONFIG points at a fresh local
# control plane): installs stowage's CRDs and CSIDriver, starts a node agent
# and the controller, and provisions a real volume for a claim. Waits for
# Ctrl-C when run from a terminal.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

kubectl() { "$STOWAGE_KUBE_BIN/kubectl" "$@"; }
stowage="$REPO_ROOT/target/debug/stowage"
logs=$STOWAGE_CLUSTER_DIR/logs
data=$STOWAGE_CLUSTER_DIR/stowage-data
node=demo-node

log "installing CRDs and the CSIDriver"
kubectl apply --server-side -f "$REPO_ROOT/crds/" >/dev/null
kubectl apply -f "$REPO_ROOT/manifests/30-csidriver.yaml" >/dev/null
kubectl wait --for condition=Established --timeout 60s crd/volumes.stowage.dev crd/storagenodes.stowage.dev >/dev/null

log "registering Node $node (the node agent's host)"
kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Node
metadata:
  name: $node
  labels: {kubernetes.io/hostname: $node, topology.stowage.dev/node: $node}
YAML

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT
log "starting stowage node (data in $data, log $logs/stowage-node.log)"
setpriv --pdeathsig TERM -- "$stowage" node --node-name "$node" --data-dir "$data" \
  --kubelet-dir "$STOWAGE_CLUSTER_DIR/kubelet" \
  --capacity 10Gi --metrics-addr 127.0.0.1:0 > "$logs/stowage-node.log" 2>&1 &
pids+=($!)
log "starting stowage controller (log $logs/stowage-controller.log)"
setpriv --pdeathsig TERM -- "$stowage" controller --leader-election-namespace default \
  --metrics-addr 127.0.0.1:0 > "$logs/stowage-controller.log" 2>&1 &
pids+=($!)

kubectl apply -f - <<'YAML'
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: stowage-local
provisioner: local.stowage.dev
volumeBindingMode: Immediate
reclaimPolicy: Delete
allowVolumeExpansion: true
parameters:
  fsType: ext4
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: demo
  namespace: default
spec:
  storageClassName: stowage-local
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: 1Gi
YAML

if ! kubectl wait --for=jsonpath='{.status.phase}'=Bound pvc/demo --timeout 60s; then
  kubectl describe pvc demo
  die "the claim was not bound; logs in $logs"
fi
echo
kubectl get pvc,pv -o wide
echo
kubectl get volumes.stowage.dev,storagenodes.stowage.dev
echo
kubectl get events --field-selector involvedObject.name=demo
echo
echo "The volume's data on $node:"
ls -ls "$data/volumes/"
file_type=$(blkid -o value -s TYPE "$data"/volumes/*.img 2>/dev/null || true)
[[ -n "$file_type" ]] && echo "filesystem: $file_type"

cat <<MSG

The local control plane is up with stowage provisioning real volumes. In another shell:

  export KUBECONFIG=$KUBECONFIG
  alias kubectl=$STOWAGE_KUBE_BIN/kubectl
  kubectl get pvc,pv,volumes.stowage.dev

Logs of every component: $logs/
MSG
if [[ -t 0 ]]; then
  echo "Press Ctrl-C to stop everything."
  wait
fi
