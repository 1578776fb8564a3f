#!/usr/bin/env bash
# Fails when a PostgreSQL server started by the emulator (data directory under a pg-entra-emu-*
# directory) or a Prometheus started by the operations tests (its config in a temporary directory)
# is still running after the tests, and stops it: tests must leave none behind.
set -u
pattern='-D [^ ]*/pg-entra-emu-[^ ]*/data|prometheus --config.file=[^ ]*/\.tmp[^ /]*/prometheus.yml'
for _ in 1 2 3 4 5 6; do
  pids=$(pgrep -f -- "$pattern" || true)
  [ -z "$pids" ] && { echo "== no emulator PostgreSQL or test Prometheus left running"; exit 0; }
  sleep 1
done
echo "processes the tests started are still running:" >&2
ps -o pid,user,args -p $pids >&2 || true
kill -INT $pids 2>/dev/null || true
exit 1
