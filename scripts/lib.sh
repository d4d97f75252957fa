# Shared settings for the project's scripts: pinned versions and the cache.
# Sourced, not run.

KUBE_VERSION=v1.36.3
ETCD_VERSION=v3.6.16

STOWAGE_CACHE=${STOWAGE_CACHE:-$HOME/.cache/stowage}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '%s %s\n' "[$(date +%H:%M:%S)]" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
