#!/usr/bin/env bash
# Makes sure Prometheus's `promtool` and `prometheus` are installed, for the tests of the alert
# rules and the dashboard in ops/. As root, installs Debian's `prometheus` package without starting
# its service; otherwise says exactly what to install.
set -euo pipefail

command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "Prometheus's promtool is missing. Install it, then run this again:" >&2
  echo "    sudo apt-get install prometheus      # Debian/Ubuntu (promtool and prometheus)" >&2
  echo "    (elsewhere: the prometheus release archive from https://prometheus.io/download/)" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "promtool is missing and apt-get is not available: install Prometheus (promtool and prometheus) with this system's package manager." >&2
  exit 1
fi
echo "installing prometheus (promtool) with apt-get (its service is not started)"
export DEBIAN_FRONTEND=noninteractive
# No service may start during the installation: a policy-rc.d that denies every action, removed
# afterwards unless one was there before.
policy=/usr/sbin/policy-rc.d
created=no
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  created=yes
fi
trap '[ "$created" = yes ] && rm -f "$policy"' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool >/dev/null 2>&1 || { echo "installed prometheus, but promtool is still not found" >&2; exit 1; }
