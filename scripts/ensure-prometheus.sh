#!/usr/bin/env bash
# Makes sure Prometheus's `promtool` and `prometheus` are installed, for the tests of the alert
# rules and the dashboard in ops/. As root, installs Debian's `prometheus` package without starting
# its service; otherwise says exactly what to install.
set -euo pipefail
. "$(dirname "$0")/apt-install.sh"

command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 && exit 0

apt_ready "Prometheus's promtool" \
  "the prometheus release archive from https://prometheus.io/download/" prometheus
apt_install prometheus
command -v promtool >/dev/null 2>&1 || { echo "installed prometheus, but promtool is still not found" >&2; exit 1; }
