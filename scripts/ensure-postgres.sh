#!/usr/bin/env bash
# Makes sure PostgreSQL's server programs (initdb, postgres) and psql are installed; the emulator
# finds them on PATH or under /usr/lib/postgresql/*/bin. As root, installs Debian's packages without
# creating or starting a system cluster; otherwise says exactly what to install.
set -euo pipefail

have_server() {
  command -v initdb >/dev/null 2>&1 || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

missing=()
have_server || missing+=(postgresql)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "PostgreSQL is missing (${missing[*]}). Install it, then run this again:" >&2
  echo "    sudo apt-get install ${missing[*]}      # Debian/Ubuntu" >&2
  echo "    (elsewhere: your OS's PostgreSQL server and client packages, version 13 or newer)" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "PostgreSQL is missing (${missing[*]}) and apt-get is not available: install the PostgreSQL server and client with this system's package manager." >&2
  exit 1
fi
echo "installing ${missing[*]} with apt-get (no system cluster is created or started)"
mkdir -p /etc/postgresql-common
grep -qs '^create_main_cluster *= *false' /etc/postgresql-common/createcluster.conf ||
  echo 'create_main_cluster = false' >> /etc/postgresql-common/createcluster.conf
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
have_server || { echo "installed ${missing[*]}, but initdb is still not found" >&2; exit 1; }
