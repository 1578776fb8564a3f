# Sourced by scripts/ensure-*.sh.
#
# `apt_ready WHAT ELSEWHERE PACKAGE...` returns when this process can install the Debian packages
# (root, apt-get present); otherwise it says exactly what to install (WHAT is missing; ELSEWHERE is
# how to get it on other systems) and exits 1.
# `apt_install PACKAGE...` then installs them without starting any service they bring.
apt_ready() {
  local what=$1 elsewhere=$2
  shift 2
  if [ "$(id -u)" -ne 0 ]; then
    echo "$what is missing ($*). Install it, then run this again:" >&2
    echo "    sudo apt-get install $*      # Debian/Ubuntu" >&2
    echo "    (elsewhere: $elsewhere)" >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "$what is missing ($*) and apt-get is not available; install it with this system's package manager ($elsewhere)." >&2
    exit 1
  fi
}

apt_install() {
  echo "installing $* with apt-get (no service is started)"
  export DEBIAN_FRONTEND=noninteractive
  # No service may start during the installation: a policy-rc.d that denies every action, removed
  # afterwards unless one was there before.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
