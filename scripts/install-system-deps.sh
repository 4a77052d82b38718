#!/bin/sh
# Install the Debian 12 packages the local Slurm devcluster (hpcjobs.devcluster) needs.
#
# Idempotent: when everything is already installed it exits at once without
# touching apt.  Packages are installed without starting their system services
# (a temporary /usr/sbin/policy-rc.d answers 101); the devcluster runs its own
# private daemons under its root directory.
#
# Usage: scripts/install-system-deps.sh        (as root, or with sudo available)
set -eu

PACKAGES="
slurmctld
slurmd
slurmdbd
slurm-client
slurm-wlm-basic-plugins
slurm-wlm-mysql-plugin
munge
mariadb-server-core
mariadb-client-core
chromium
"
# chromium: the tests open `hpcjobs report` pages in it (headless).
# Also used, but Priority: required on every Debian system: util-linux
# (unshare), mount, hostname.

missing=""
for pkg in $PACKAGES; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "installed" ] || missing="$missing $pkg"
done

if [ -z "$missing" ]; then
    echo "install-system-deps: all devcluster packages are installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo -- "$0" "$@"
    fi
    echo "install-system-deps: must run as root to install:$missing" >&2
    exit 1
fi

if [ ! -r /etc/debian_version ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: needs Debian/Ubuntu with apt-get; install by hand:$missing" >&2
    exit 1
fi

echo "install-system-deps: installing:$missing"

POLICY=/usr/sbin/policy-rc.d
created_policy=""
cleanup() {
    if [ -n "$created_policy" ]; then
        rm -f "$POLICY"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n# installed temporarily by hpcjobs scripts/install-system-deps.sh\nexit 101\n' >"$POLICY"
    chmod 0755 "$POLICY"
    created_policy=1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $missing

echo "install-system-deps: done"
