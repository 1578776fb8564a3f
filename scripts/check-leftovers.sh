#!/usr/bin/env bash
# Fails when a server this test run started is still running after the tests, and stops it: tests
# must leave none behind. The testkit records each server it starts (PostgreSQL, and Prometheus in
# the operations tests) as a file named by its process id and holding its start time, in the
# directory given as the argument (make test: $POSTGRES_ENTRA_TEST_PROCESSES). Only those processes,
# checked by id and start time, are ever signalled: never a user's own emulator or PostgreSQL,
# whatever its command line looks like.
set -u
dir=${1:-}
[ -n "$dir" ] || { echo "usage: check-leftovers.sh RECORDS_DIRECTORY" >&2; exit 2; }
tries=${POSTGRES_ENTRA_LEFTOVER_WAIT:-6}

# Whether process $1 runs and started at $2 (clock ticks since boot: field 22 of /proc/PID/stat,
# counted after the command name, which may hold spaces).
started_at() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  [ "$(printf '%s\n' "${stat##*) }" | awk '{print $20}')" = "$2" ]
}

left=()
for ((try = 0; try < tries; try++)); do
  left=()
  for record in "$dir"/*; do
    [ -f "$record" ] || continue
    pid=${record##*/}
    read -r start _ < "$record" || continue
    started_at "$pid" "$start" && left+=("$pid")
  done
  [ ${#left[@]} -eq 0 ] && break
  sleep 1
done
if [ ${#left[@]} -eq 0 ]; then
  echo "== no server started by this run is left running"
  rm -rf "$dir"
  exit 0
fi
echo "servers this run started are still running:" >&2
ps -o pid,user,args -p "${left[@]}" >&2 || true
kill -INT "${left[@]}" 2>/dev/null || true
exit 1
