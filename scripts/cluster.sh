#!/usr/bin/env bash
# A real local Kubernetes control plane on loopback: etcd, kube-apiserver,
# kube-controller-manager and kube-scheduler, built by build-control-plane.sh.
#
#   cluster.sh run [--] CMD...   start, run CMD with KUBECONFIG set, tear down
#   cluster.sh serve             start, print `kubeconfig=PATH`, tear down when
#                                stdin closes (used by the Rust test harness)
#   cluster.sh down DIR          tear down a cluster left behind in DIR
#
# Every component listens on 127.0.0.1 on ports picked free at start, and is
# killed when this script exits for any reason (it also gets SIGKILL if this
# script dies without cleaning up). Nothing is left running.
#
# Environment:
#   STOWAGE_KCM_CONTROLLERS  kube-controller-manager --controllers (default "*")
#   STOWAGE_CLUSTER_DIR      where to keep state (default: a fresh temp dir)
#   STOWAGE_CLUSTER_KEEP=1   keep the state directory after teardown
#   STOWAGE_WITH_NODE=1      also run a real node: containerd + kubelet (node.sh)
#   STOWAGE_APISERVER_FEATURE_GATES  more kube-apiserver feature gates, e.g.
#                            WatchList=false (as 1.33 ships) to try the
#                            paged-list fallback
#   STOWAGE_AUDIT=1          audit log of every request by a ServiceAccount of
#                            stowage-system (metadata only) in DIR/logs/audit.log
#   STOWAGE_PROFILING=1      serve /debug/pprof on kube-apiserver,
#                            kube-controller-manager and kube-scheduler (for
#                            `go tool pprof` with DIR's admin.crt/admin.key)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/node.sh"

free_ports() { # count
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

gen_certs() { # dir
  local d=$1
  (
    cd "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3 \
      -subj "/CN=stowage-local-ca" 2>/dev/null
    sign() { # name, subject, extensions
      openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
      printf '%s\n' "$3" > "$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
      rm -f "$1.csr" "$1.ext"
    }
    sign apiserver "/CN=kube-apiserver" \
      "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,IP:$POD_GATEWAY,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth"
    sign admin "/O=system:masters/CN=stowage-admin" "extendedKeyUsage=clientAuth"
    # The API server's identity towards kubelet (kubectl logs, exec).
    sign kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "extendedKeyUsage=clientAuth"
    sign controller-manager "/CN=system:kube-controller-manager" "extendedKeyUsage=clientAuth"
    sign scheduler "/CN=system:kube-scheduler" "extendedKeyUsage=clientAuth"
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
}

write_kubeconfig() { # file, user cert name, server
  local d; d=$(dirname "$1")
  cat > "$1" <<YAML
apiVersion: v1
kind: Config
clusters:
- name: stowage-local
  cluster:
    server: $3
    certificate-authority: $d/ca.crt
users:
- name: $2
  user:
    client-certificate: $d/$2.crt
    client-key: $d/$2.key
contexts:
- name: stowage-local
  context: {cluster: stowage-local, user: $2}
current-context: stowage-local
YAML
}

# Starts a component in the background with its output in DIR/logs/NAME.log.
# pdeathsig makes the kernel kill it if this script dies before teardown.
start() { # name, binary, args...
  local name=$1; shift
  setpriv --pdeathsig KILL -- "$@" > "$dir/logs/$name.log" 2>&1 &
  echo "$! $name" >> "$dir/pids"
}

wait_healthy() { # name, url, seconds, curl args...
  local name=$1 url=$2 secs=$3; shift 3
  local deadline=$((SECONDS + secs))
  until curl -fsS --max-time 2 "$@" "$url" > /dev/null 2>&1; do
    if ! alive "$name"; then
      tail -n 30 "$dir/logs/$name.log" >&2
      die "$name exited during start; its log is above (full log: $dir/logs/$name.log)"
    fi
    if ((SECONDS > deadline)); then
      tail -n 30 "$dir/logs/$name.log" >&2
      die "$name not healthy at $url after ${secs}s (log: $dir/logs/$name.log)"
    fi
    sleep 0.2
  done
}

alive() { # name
  local pid; pid=$(awk -v n="$1" '$2 == n {print $1}' "$dir/pids")
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

up() {
  local bin
  bin=$(bash "$REPO_ROOT/scripts/build-control-plane.sh")
  mkdir -p "$dir/logs" "$dir/etcd"
  : > "$dir/pids"
  gen_certs "$dir"
  read -r etcd_port etcd_peer api_port kcm_port sched_port < <(free_ports 5)
  local api="https://127.0.0.1:$api_port"
  # Pods on the test node's pod network reach the API server through the
  # bridge's gateway address; without a node nothing listens beyond loopback.
  local api_bind=127.0.0.1
  [[ "${STOWAGE_WITH_NODE:-}" == 1 ]] && api_bind=0.0.0.0
  write_kubeconfig "$dir/kubeconfig" admin "$api"
  write_kubeconfig "$dir/controller-manager.kubeconfig" controller-manager "$api"
  write_kubeconfig "$dir/scheduler.kubeconfig" scheduler "$api"

  start etcd "$bin/etcd" --name local --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "local=http://127.0.0.1:$etcd_peer" \
    --unsafe-no-fsync --log-level warn
  wait_healthy etcd "http://127.0.0.1:$etcd_port/health" 60

  local profiling=false
  [[ "${STOWAGE_PROFILING:-}" == 1 ]] && profiling=true
  local -a audit=()
  if [[ "${STOWAGE_AUDIT:-}" == 1 ]]; then
    cat > "$dir/audit-policy.yaml" <<'YAML'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts:stowage-system"]
  - level: None
YAML
    audit=(--audit-policy-file "$dir/audit-policy.yaml" --audit-log-path "$dir/logs/audit.log"
      --audit-log-format json --audit-log-mode blocking)
  fi

  # CrossNamespaceVolumeDataSource (alpha): without it the API server drops
  # a claim's dataSourceRef.namespace. kube-controller-manager does not read
  # the gate.
  start kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address "$api_bind" --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --tls-cert-file "$dir/apiserver.crt" --tls-private-key-file "$dir/apiserver.key" \
    --client-ca-file "$dir/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$dir/sa.pub" \
    --service-account-signing-key-file "$dir/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 \
    --authorization-mode Node,RBAC --allow-privileged=true \
    --kubelet-client-certificate "$dir/kubelet-client.crt" --kubelet-client-key "$dir/kubelet-client.key" \
    --kubelet-preferred-address-types Hostname,InternalIP \
    --feature-gates "CrossNamespaceVolumeDataSource=true${STOWAGE_APISERVER_FEATURE_GATES:+,$STOWAGE_APISERVER_FEATURE_GATES}" \
    --profiling="${profiling}" --v=1 "${audit[@]}"
  wait_healthy kube-apiserver "$api/readyz" 120 --cacert "$dir/ca.crt" \
    --cert "$dir/admin.crt" --key "$dir/admin.key"

  start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$dir/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$dir/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$dir/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$kcm_port" \
    --service-account-private-key-file "$dir/sa.key" --root-ca-file "$dir/ca.crt" \
    --cluster-signing-cert-file "$dir/ca.crt" --cluster-signing-key-file "$dir/ca.key" \
    --controllers "${STOWAGE_KCM_CONTROLLERS:-*}" --use-service-account-credentials \
    --leader-elect=false --profiling="${profiling}" --v=1
  start kube-scheduler "$bin/kube-scheduler" \
    --kubeconfig "$dir/scheduler.kubeconfig" \
    --authentication-kubeconfig "$dir/scheduler.kubeconfig" \
    --authorization-kubeconfig "$dir/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$sched_port" \
    --leader-elect=false --profiling="${profiling}" --v=1
  wait_healthy kube-controller-manager "https://127.0.0.1:$kcm_port/healthz" 60 -k
  wait_healthy kube-scheduler "https://127.0.0.1:$sched_port/healthz" 60 -k
  # Pods are refused until their namespace's ServiceAccount exists, and
  # wait for the CA bundle their token volume carries.
  local deadline=$((SECONDS + 60))
  until "$bin/kubectl" --kubeconfig "$dir/kubeconfig" -n default get serviceaccount/default configmap/kube-root-ca.crt >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "kube-controller-manager made no default ServiceAccount (log: $dir/logs/kube-controller-manager.log)"
    sleep 0.2
  done

  cat > "$dir/env" <<ENV
export KUBECONFIG=$dir/kubeconfig
export STOWAGE_CLUSTER_DIR=$dir
export STOWAGE_KUBE_BIN=$bin
export STOWAGE_API_PORT=$api_port
export STOWAGE_KCM_PORT=$kcm_port
ENV
  log "control plane ready: $api (KUBECONFIG=$dir/kubeconfig, logs in $dir/logs)"
  if [[ "${STOWAGE_WITH_NODE:-}" == 1 ]]; then
    node_up "$bin" "$api"
  fi
}

# Stops components in reverse start order: TERM, then KILL after 5s.
down() {
  [[ -f "$dir/pids" ]] || return 0
  node_down
  local pid name entry
  local -a entries
  mapfile -t entries < <(tac "$dir/pids")
  for entry in "${entries[@]}"; do
    read -r pid name <<< "$entry"
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do
      # A stopped child stays a zombie until waited for; treat that as gone.
      [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" =~ ^[RSDTt]$ ]] || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -f "$dir/pids"
  node_unmount
  if [[ "${STOWAGE_CLUSTER_KEEP:-}" == 1 ]]; then
    log "control plane stopped; state kept in $dir"
  else
    rm -rf "$dir"
  fi
}

new_dir() {
  if [[ -n "${STOWAGE_CLUSTER_DIR:-}" ]]; then dir=$STOWAGE_CLUSTER_DIR; mkdir -p "$dir"
  else dir=$(mktemp -d "${TMPDIR:-/tmp}/stowage-cluster.XXXXXX"); fi
}

cmd=${1:-}; shift || true
case "$cmd" in
  run)
    [[ "${1:-}" == "--" ]] && shift
    (($#)) || die "usage: cluster.sh run [--] COMMAND..."
    new_dir
    trap down EXIT
    trap 'exit 130' INT TERM
    up
    # shellcheck disable=SC1091
    source "$dir/env"
    "$@"
    ;;
  serve)
    new_dir
    trap down EXIT
    trap 'exit 130' INT TERM HUP
    up
    echo "kubeconfig=$dir/kubeconfig"
    # Runs until whoever started us closes our stdin (or exits).
    while read -r _; do :; done
    ;;
  down)
    dir=${1:?usage: cluster.sh down DIR}
    down
    ;;
  *)
    die "usage: cluster.sh run [--] COMMAND... | serve | down DIR"
    ;;
esac
