#!/usr/bin/env bash
# hold.sh [--cleanup DIR] -- COMMAND...
# Runs COMMAND until whoever started us closes our stdin (for example by
# exiting), then stops it with SIGTERM (SIGKILL after 5s) and removes DIR.
# Exits with COMMAND's status (137 when it had to be killed).
# Test harnesses use it so that no process outlives the test run.
set -uo pipefail
cleanup=
if [[ "${1:-}" == --cleanup ]]; then cleanup=$2; shift 2; fi
[[ "${1:-}" == -- ]] && shift
# A dead child stays a zombie until waited for; that counts as not running.
running() { [[ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" =~ ^[RSDTt]$ ]]; }
"$@" < /dev/null &
child=$!
# Wait for EOF on stdin or for the child to end, whichever comes first.
while running "$child"; do
  read -r -t 1 _ ; rc=$?
  if ((rc > 0 && rc <= 128)); then break; fi   # EOF (timeouts are > 128)
done
kill -TERM "$child" 2>/dev/null
for _ in $(seq 50); do running "$child" || break; sleep 0.1; done
kill -KILL "$child" 2>/dev/null
wait "$child" 2>/dev/null
rc=$?
[[ -n "$cleanup" ]] && rm -rf "$cleanup"
exit "$rc"
