#!/usr/bin/env bash
# The demo, run inside `STOWAGE_WITH_NODE=1 cluster.sh run` (KUBECONFIG points
# at a fresh local control plane with a real kubelet node): installs stowage
# as users do — its image imported into the node's containerd, then
# `kubectl apply -k manifests/` (through scripts/install-local.sh) — and
# runs a pod that writes to a freshly provisioned volume.
# Waits for Ctrl-C when run from a terminal.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

kubectl() { "$STOWAGE_KUBE_BIN/kubectl" "$@"; }
logs=$STOWAGE_CLUSTER_DIR/logs
[[ -n ${STOWAGE_NODE_NAME:-} ]] || die "run me through STOWAGE_WITH_NODE=1 scripts/cluster.sh run"
tag=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO_ROOT/Cargo.toml" | head -1)

log "importing the stowage image into the node's containerd"
bash "$REPO_ROOT/scripts/install-local.sh" import "$tag"
log "kubectl apply -k manifests/ (with the local cluster's overlay)"
bash "$REPO_ROOT/scripts/install-local.sh" apply "$tag" >/dev/null
kubectl -n stowage-system rollout status deploy/stowage-controller --timeout 180s
kubectl -n stowage-system rollout status ds/stowage-node --timeout 180s

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
  kubectl -n stowage-system logs -l app.kubernetes.io/part-of=stowage --tail 50
  die "the pod did not complete; logs in $logs"
fi
echo
kubectl -n stowage-system get pods -o wide
echo
kubectl get pod,pvc,pv -o wide
echo
kubectl get volumes.stowage.dev,storagenodes.stowage.dev
echo
kubectl get events --field-selector involvedObject.name=demo
echo
echo "$ kubectl logs writer"
kubectl logs writer

cat <<MSG

The local control plane is up with stowage installed from its image and
provisioning real volumes. In another shell:

  export KUBECONFIG=$KUBECONFIG
  alias kubectl=$STOWAGE_KUBE_BIN/kubectl
  kubectl get pvc,pv,volumes.stowage.dev
  kubectl -n stowage-system logs deploy/stowage-controller

Logs of the control plane: $logs/
MSG
if [[ -t 0 ]]; then
  echo "Press Ctrl-C to stop everything."
  while sleep 3600; do :; done
fi
