# A real Kubernetes node for the local control plane: containerd (Debian's,
# with runc and the CNI plugins) and kubelet (built with the control plane),
# sourced by cluster.sh when STOWAGE_WITH_NODE=1. Pod images are built from
# busybox-static and imported; nothing is pulled. A bridge CNI config lets the
# node report Ready; the project's own pods use the host network.
#
# Everything lives under $dir/node: containerd's root and state, kubelet's
# root directory (so CSI paths are $dir/node/kubelet/...), logs in $dir/logs.

# kubelet refuses a loopback node IP, so the API server reaches this kubelet
# (kubectl logs, exec) by the node's Hostname address, which is its name:
# "localhost" resolves to loopback everywhere.
NODE_NAME=${STOWAGE_NODE_NAME:-localhost}
POD_SUBNET=${STOWAGE_POD_SUBNET:-10.244.0.0/24}
POD_GATEWAY=$(python3 -c 'import ipaddress, sys; print(next(ipaddress.ip_network(sys.argv[1]).hosts()))' "$POD_SUBNET")

node_up() { # bin dir, api server URL
  local bin=$1 n=$dir/node
  mkdir -p "$n/cni" "$n/kubelet" "$n/images"
  for cmd in containerd runc ctr; do
    command -v "$cmd" >/dev/null || die "$cmd missing: run scripts/install-deps.sh (needs Debian's containerd and runc)"
  done
  [[ -x /usr/lib/cni/bridge ]] || die "CNI plugins missing: run scripts/install-deps.sh (Debian's containernetworking-plugins)"

  containerd config default | sed \
    -e "s|^root = .*|root = \"$n/containerd\"|" \
    -e "s|^state = .*|state = \"$n/containerd-state\"|" \
    -e "0,/^  address = \"\/run\/containerd\/containerd.sock\"/s||  address = \"$n/containerd.sock\"|" \
    -e "s|restrict_oom_score_adj = false|restrict_oom_score_adj = true|" \
    -e "s|sandbox_image = .*|sandbox_image = \"stowage.dev/pause:1\"|" \
    -e "s|bin_dir = \"/opt/cni/bin\"|bin_dir = \"/usr/lib/cni\"|" \
    -e "s|conf_dir = \"/etc/cni/net.d\"|conf_dir = \"$n/cni\"|" \
    > "$n/containerd.toml"
  grep -q "address = \"$n/containerd.sock\"" "$n/containerd.toml" || die "could not point containerd at $n/containerd.sock"
  cat > "$n/cni/10-stowage.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "stowage-local", "plugins": [
  {"type": "bridge", "bridge": "stowage0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "dataDir": "$n/cni-ipam", "ranges": [[{"subnet": "$POD_SUBNET"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "loopback"}]}
JSON
  start containerd containerd --config "$n/containerd.toml"
  for _ in $(seq 100); do [[ -S "$n/containerd.sock" ]] && break; sleep 0.1; done
  [[ -S "$n/containerd.sock" ]] || die "containerd did not start (log: $dir/logs/containerd.log)"

  local images="$STOWAGE_CACHE/pod-images"
  [[ -f "$images/busybox.tar" ]] || python3 "$REPO_ROOT/scripts/pod-images.py" "$images"
  for image in pause busybox; do
    ctr --address "$n/containerd.sock" -n k8s.io images import "$images/$image.tar" >/dev/null
  done

  read -r kubelet_port healthz_port < <(free_ports 2)
  cat > "$n/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroup v1 hosts: kubelet refuses them unless told otherwise.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $dir/ca.crt}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://$n/containerd.sock
address: 127.0.0.1
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $healthz_port
failSwapOn: false
resolvConf: /etc/resolv.conf
evictionHard: {}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
localStorageCapacityIsolation: false
# kubelet notices a grown volume under a running pod on its next pod sync;
# the default (1m) would make every online expansion wait that long.
syncFrequency: 10s
YAML
  start kubelet "$bin/kubelet" --config "$n/kubelet.yaml" --kubeconfig "$dir/kubeconfig" \
    --hostname-override "$NODE_NAME" --root-dir "$n/kubelet" --v=1
  wait_healthy kubelet "http://127.0.0.1:$healthz_port/healthz" 60
  # `kubectl wait` gives up at once on an object that does not exist yet.
  local deadline=$((SECONDS + 90))
  until "$bin/kubectl" --kubeconfig "$dir/kubeconfig" get "node/$NODE_NAME" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "kubelet never registered node $NODE_NAME (log: $dir/logs/kubelet.log)"
    alive kubelet || die "kubelet exited (log: $dir/logs/kubelet.log)"
    sleep 0.2
  done
  "$bin/kubectl" --kubeconfig "$dir/kubeconfig" wait --for condition=Ready --timeout 90s "node/$NODE_NAME" >/dev/null ||
    die "node $NODE_NAME not Ready (log: $dir/logs/kubelet.log)"
  cat >> "$dir/env" <<ENV
export STOWAGE_NODE_NAME=$NODE_NAME
export STOWAGE_KUBELET_DIR=$n/kubelet
export STOWAGE_POD_GATEWAY=$POD_GATEWAY
export STOWAGE_CONTAINERD_SOCKET=$n/containerd.sock
ENV
  log "node $NODE_NAME ready (kubelet root $n/kubelet)"
}

# Before kubelet and containerd stop: kill every container (their shims
# outlive containerd by design), then undo every mount under $dir.
node_down() {
  local n=$dir/node shim
  [[ -d "$n" ]] || return 0
  # A container's first process is a child of its shim; killing it ends the
  # container's PID namespace and with it everything inside.
  for shim in $(pgrep -f "containerd-shim.*-address $n/containerd.sock" || true); do
    pkill -KILL -P "$shim" 2>/dev/null || true
  done
}

node_unmount() {
  local n=$dir/node
  pkill -KILL -f "containerd-shim.*-address $n/containerd.sock" 2>/dev/null || true
  # Deepest first; lazily, since a dead shim may still hold a mount briefly.
  { findmnt -rn -o TARGET | grep "^$dir/" || true; } | sort -r | while read -r target; do
    umount -l "$target" 2>/dev/null || true
  done
  # Loop devices of volumes kept under $dir whose pods never got unstaged.
  { losetup -a 2>/dev/null | grep "($dir/" || true; } | cut -d: -f1 | while read -r dev; do
    losetup -d "$dev" 2>/dev/null || true
  done
  if [[ -d "$dir/node" ]]; then ip link delete stowage0 2>/dev/null || true; fi
}
