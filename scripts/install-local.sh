#!/usr/bin/env bash
# Installs stowage into the local cluster as users install it: the image
# imported into the node's containerd, then `kubectl apply -k` of an overlay
# whose base is manifests/. The overlay changes only what this cluster
# needs: the API server's address for pods (there is no kube-proxy), the
# kubelet root and data directory of the test node, and never pulling
# images (there is no registry).
#
#   install-local.sh import TAG   import target/image/stowage-TAG.tar
#   install-local.sh apply TAG    apply the manifests with images: newTag TAG
#
# Runs inside `STOWAGE_WITH_NODE=1 cluster.sh run` (or with
# STOWAGE_CLUSTER_DIR pointing at such a cluster).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

cmd=${1:-}
tag=${2:-}
[[ -n $cmd && -n $tag ]] || die "usage: install-local.sh import|apply TAG"
dir=${STOWAGE_CLUSTER_DIR:?run me inside STOWAGE_WITH_NODE=1 scripts/cluster.sh run}
# shellcheck disable=SC1091
source "$dir/env"
[[ -n ${STOWAGE_KUBELET_DIR:-} ]] || die "the cluster in $dir has no node (STOWAGE_WITH_NODE=1)"

case "$cmd" in
  import)
    archive=$REPO_ROOT/target/image/stowage-$tag.tar
    [[ -f $archive ]] || die "$archive missing: run scripts/build-image.sh $tag"
    ctr --address "$STOWAGE_CONTAINERD_SOCKET" -n k8s.io images import "$archive" >/dev/null
    ;;
  apply)
    overlay=$dir/stowage-overlay
    mkdir -p "$overlay"
    base=$(realpath --relative-to="$overlay" "$REPO_ROOT/manifests")
    data=$dir/node/stowage-data
    env_patch="
      - {op: add, path: /spec/template/spec/containers/0/env/-, value: {name: KUBERNETES_SERVICE_HOST, value: \"$STOWAGE_POD_GATEWAY\"}}
      - {op: add, path: /spec/template/spec/containers/0/env/-, value: {name: KUBERNETES_SERVICE_PORT, value: \"$STOWAGE_API_PORT\"}}
      - {op: add, path: /spec/template/spec/containers/0/imagePullPolicy, value: Never}"
    # The test ops fail the apply if manifests/ moved what this replaces.
    cat > "$overlay/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $base
images:
  - name: stowage.dev/stowage
    newTag: "$tag"
patches:
  - target: {kind: Deployment, name: stowage-controller}
    patch: |-$env_patch
  - target: {kind: DaemonSet, name: stowage-node}
    patch: |-$env_patch
      - {op: test, path: /spec/template/spec/volumes/0/name, value: kubelet}
      - {op: replace, path: /spec/template/spec/volumes/0/hostPath/path, value: "$STOWAGE_KUBELET_DIR"}
      - {op: replace, path: /spec/template/spec/containers/0/volumeMounts/0/mountPath, value: "$STOWAGE_KUBELET_DIR"}
      - {op: test, path: /spec/template/spec/volumes/1/name, value: data}
      - {op: replace, path: /spec/template/spec/volumes/1/hostPath/path, value: "$data"}
      - {op: replace, path: /spec/template/spec/containers/0/volumeMounts/1/mountPath, value: "$data"}
      - {op: test, path: /spec/template/spec/containers/0/env/2/name, value: STOWAGE_DATA_DIR}
      - {op: replace, path: /spec/template/spec/containers/0/env/2/value, value: "$data"}
      - {op: test, path: /spec/template/spec/containers/0/env/3/name, value: KUBELET_DIR}
      - {op: replace, path: /spec/template/spec/containers/0/env/3/value, value: "$STOWAGE_KUBELET_DIR"}
YAML
    "$STOWAGE_KUBE_BIN/kubectl" --kubeconfig "$dir/kubeconfig" apply -k "$overlay"
    ;;
  *)
    die "usage: install-local.sh import|apply TAG"
    ;;
esac
