#!/usr/bin/env bash
# Makes sure PostgreSQL's server programs (initdb, postgres) and psql are installed; the emulator
# finds them on PATH or under /usr/lib/postgresql/*/bin. As root, installs Debian's packages without
# creating or starting a system cluster; otherwise says exactly what to install.
set -euo pipefail
. "$(dirname "$0")/apt-install.sh"

have_server() {
  command -v initdb >/dev/null 2>&1 || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

missing=()
have_server || missing+=(postgresql)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
[ ${#missing[@]} -eq 0 ] && exit 0

apt_ready PostgreSQL \
  "your OS's PostgreSQL server and client packages, version 13 or newer" "${missing[@]}"
# No system cluster: the emulator makes its own.
mkdir -p /etc/postgresql-common
grep -qs '^create_main_cluster *= *false' /etc/postgresql-common/createcluster.conf ||
  echo 'create_main_cluster = false' >> /etc/postgresql-common/createcluster.conf
apt_install "${missing[@]}"
have_server || { echo "installed ${missing[*]}, but initdb is still not found" >&2; exit 1; }
