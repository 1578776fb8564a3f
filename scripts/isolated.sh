#!/usr/bin/env bash
# Runs a command in a network namespace of its own whose only interface is loopback, so nothing it
# starts can send a packet anywhere else. Needs root (or unprivileged user namespaces) and `ip`; where
# those are missing, runs the command as it is and says so.
set -euo pipefail
if command -v unshare >/dev/null 2>&1 && command -v ip >/dev/null 2>&1 \
   && unshare --net true 2>/dev/null; then
  echo "== network isolation: loopback only (unshare --net)"
  exec unshare --net -- sh -c 'ip link set lo up && exec "$@"' isolated "$@"
fi
echo "== network isolation unavailable here (no unshare/ip or no permission): running unisolated"
exec "$@"
