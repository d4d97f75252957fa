#!/usr/bin/env bash
# The demo, run inside `STOWAGE_WITH_NODE=1 cluster.sh run` (KUBECONFIG points
# at a fresh local control plane with a real kubelet node): installs stowage's
# CRDs and CSIDriver, starts the node agent (which registers with kubelet) and
# the controller, and runs a pod that writes to a freshly provisioned volume.
# Waits for Ctrl-C when run from a terminal.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

kubectl() { "$STOWAGE_KUBE_BIN/kubectl" "$@"; }
stowage="$REPO_ROOT/target/debug/stowage"
logs=$STOWAGE_CLUSTER_DIR/logs
data=$STOWAGE_CLUSTER_DIR/stowage-data
node=${STOWAGE_NODE_NAME:?run me through STOWAGE_WITH_NODE=1 scripts/cluster.sh run}

log "installing CRDs and the CSIDriver"
kubectl apply --server-side -f "$REPO_ROOT/crds/" >/dev/null
kubectl apply -f "$REPO_ROOT/manifests/30-csidriver.yaml" >/dev/null
kubectl wait --for condition=Established --timeout 60s crd/volumes.stowage.dev crd/storagenodes.stowage.dev >/dev/null

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT
log "starting stowage node (data in $data, log $logs/stowage-node.log)"
setpriv --pdeathsig TERM -- "$stowage" node --node-name "$node" --data-dir "$data" \
  --kubelet-dir "$STOWAGE_KUBELET_DIR" \
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
volumeBindingMode: WaitForFirstConsumer
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
---
apiVersion: v1
kind: Pod
metadata:
  name: writer
  namespace: default
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  hostNetwork: true
  containers:
    - name: writer
      image: stowage.dev/busybox:1
      imagePullPolicy: Never
      command: [/bin/sh, -c, "echo \"written by pod writer at $(date)\" > /data/hello && cat /data/hello && df -h /data"]
      volumeMounts: [{name: data, mountPath: /data}]
  volumes:
    - name: data
      persistentVolumeClaim: {claimName: demo}
YAML

if ! kubectl wait --for=jsonpath='{.status.phase}'=Succeeded pod/writer --timeout 120s; then
  kubectl describe pvc demo
  kubectl describe pod writer
  die "the pod did not complete; logs in $logs"
fi
echo
kubectl get pod,pvc,pv -o wide
echo
kubectl get volumes.stowage.dev,storagenodes.stowage.dev
echo
kubectl get events --field-selector involvedObject.name=demo
echo
echo "The volume's image file on $node:"
ls -ls "$data/volumes/"
echo
echo "What the pod wrote, read back from the image (after kubelet unmounted it):"
kubectl wait --for=delete pod/writer --timeout 5s >/dev/null 2>&1 || true
image=$(ls "$data"/volumes/*.img | head -1)
mnt=$(mktemp -d)
if mount -o loop,ro "$image" "$mnt" 2>/dev/null; then
  cat "$mnt/hello"
  umount "$mnt"
else
  echo "(the volume is still mounted for the pod; kubectl logs writer shows it)"
fi
rmdir "$mnt"

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
