#!/usr/bin/env bash
# Fails when a PostgreSQL server started by the emulator (data directory under a pg-entra-emu-*
# directory) is still running after the tests, and stops it: tests must leave none behind.
set -u
for _ in 1 2 3 4 5 6; do
  pids=$(pgrep -f -- '-D [^ ]*/pg-entra-emu-[^ ]*/data' || true)
  [ -z "$pids" ] && { echo "== no emulator PostgreSQL left running"; exit 0; }
  sleep 1
done
echo "emulator PostgreSQL processes left running after the tests:" >&2
ps -o pid,user,args -p $pids >&2 || true
kill -INT $pids 2>/dev/null || true
exit 1
