#!/usr/bin/env bash
# build-rootfs.sh - build (once) a minimal Debian root filesystem that boots a
# real systemd as PID 1 under systemd-nspawn (see box.sh).
#
# Idempotent: if $ROOTFS already carries the completion marker, nothing is done.
# The tree is built in $BOX_DIR/rootfs.partial and only renamed to $ROOTFS when
# everything succeeded, so an interrupted build never looks complete.
#
# Variables (all optional):
#   BOX_DIR         default /var/tmp/chatd-system   (keep it OUTSIDE any git checkout)
#   ROOTFS          default $BOX_DIR/rootfs
#   SUITE           default bookworm
#   MIRROR          default: the Debian mirror the host's apt already uses
#   EXTRA_PACKAGES  comma-separated extra packages for debootstrap --include
#   BOX_NAME        hostname written into the rootfs, default chatd-system
set -euo pipefail

BOX_DIR=${BOX_DIR:-/var/tmp/chatd-system}
ROOTFS=${ROOTFS:-$BOX_DIR/rootfs}
SUITE=${SUITE:-bookworm}
BOX_NAME=${BOX_NAME:-chatd-system}
PACKAGES="systemd,systemd-sysv,dbus,python3,python3-venv,iproute2,procps,make${EXTRA_PACKAGES:+,$EXTRA_PACKAGES}"
MARKER_NAME=.chatd-system-rootfs
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { printf '[build-rootfs] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"

# --- path sanity: never build over / or inside this script's directory --------
case "$ROOTFS" in /*) ;; *) die "ROOTFS must be absolute: $ROOTFS" ;; esac
mkdir -p "$BOX_DIR"
BOX_DIR=$(realpath "$BOX_DIR")
ROOTFS=$(realpath -m "$ROOTFS")
PARTIAL="$ROOTFS.partial"
[ "$ROOTFS" != / ] && [ -n "${ROOTFS#/}" ] || die "refusing ROOTFS=/"
case "$ROOTFS/" in "$HERE"/*) die "refusing to put the rootfs under $HERE (large tree; keep it outside the repo)" ;; esac

if [ -f "$ROOTFS/$MARKER_NAME" ]; then
    log "rootfs already built: $ROOTFS ($(du -sh "$ROOTFS" 2>/dev/null | cut -f1)); nothing to do"
    sed 's/^/[build-rootfs]   /' "$ROOTFS/$MARKER_NAME" >&2
    exit 0
fi
[ -e "$ROOTFS" ] && die "$ROOTFS exists but has no $MARKER_NAME marker (incomplete/foreign). Inspect and remove it yourself, then re-run."

# --- helpers --------------------------------------------------------------------
mounts_under() {  # print host mount points at or below $1
    awk -v p="$1" '$2 == p || index($2, p "/") == 1 {print $2}' /proc/self/mounts
}
safe_rm_tree() {  # remove our own partial tree, but never through a mount point
    local d=$1
    [ -n "$d" ] && [ "$d" != / ] || die "safe_rm_tree: bad path '$d'"
    if [ -n "$(mounts_under "$d")" ]; then
        die "mounts still active under $d (a killed debootstrap?): $(mounts_under "$d" | tr '\n' ' ') -- unmount them manually first"
    fi
    rm -rf --one-file-system -- "$d"
}
detect_mirror() {
    local m=""
    # deb822 *.sources: first URIs: of a stanza that is not the security archive
    if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
        m=$(awk 'tolower($1)=="uris:" {for (i=2;i<=NF;i++) if ($i !~ /security/) {print $i; exit}}' \
              /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
    fi
    # one-line format
    if [ -z "$m" ]; then
        m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            awk -v s="$SUITE" '$1=="deb" { u=""; for (i=2;i<=NF;i++) { if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; continue } u=$i; break }
                                          if (u !~ /security/ && $(i+1)==s) {print u; exit} }')
    fi
    echo "$m"
}
MIRROR=${MIRROR:-$(detect_mirror)}
[ -n "$MIRROR" ] || die "no Debian mirror found in the host's apt sources; set MIRROR"

# --- host tools (.ci/run installs them; this script installs nothing on the host)
command -v debootstrap >/dev/null || die "no debootstrap (apt-get install --no-install-recommends debootstrap)"

# --- build ----------------------------------------------------------------------
t0=$(date +%s)
if [ -e "$PARTIAL" ]; then
    log "removing leftover partial build $PARTIAL"
    safe_rm_tree "$PARTIAL"
fi
log "debootstrap --variant=minbase --include=$PACKAGES $SUITE $PARTIAL $MIRROR"
if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$PARTIAL" "$MIRROR" >"$BOX_DIR/debootstrap.log" 2>&1; then
    tail -n 30 "$BOX_DIR/debootstrap.log" >&2
    die "debootstrap failed (full log: $BOX_DIR/debootstrap.log); partial tree left at $PARTIAL"
fi
[ -z "$(mounts_under "$PARTIAL")" ] || die "debootstrap left mounts under $PARTIAL: $(mounts_under "$PARTIAL" | tr '\n' ' ')"

log "configuring the rootfs"
echo "$BOX_NAME" >"$PARTIAL/etc/hostname"
cat >"$PARTIAL/etc/hosts" <<EOF
127.0.0.1	localhost
127.0.1.1	$BOX_NAME
::1		localhost ip6-localhost ip6-loopback
EOF
# resolv.conf was copied from the host by debootstrap; the box has no network anyway.
: >"$PARTIAL/etc/resolv.conf"
# Periodic jobs that make no sense in a throw-away test box (no network, no disks).
# 'systemctl mask' inside a chroot only edits files in the chroot (it never talks to a manager).
chroot "$PARTIAL" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    systemctl mask --quiet apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
    e2scrub_all.timer e2scrub_reap.service fstrim.timer >&2
chroot "$PARTIAL" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin apt-get clean
[ -z "$(mounts_under "$PARTIAL")" ] || die "unexpected mounts under $PARTIAL"

cat >"$PARTIAL/$MARKER_NAME" <<EOF
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
suite=$SUITE
mirror=$MIRROR
packages=$PACKAGES
systemd=$(chroot "$PARTIAL" dpkg-query -W -f '${Version}' systemd)
python3=$(chroot "$PARTIAL" dpkg-query -W -f '${Version}' python3)
EOF
mv -T "$PARTIAL" "$ROOTFS"
t1=$(date +%s)
log "done in $((t1 - t0))s: $ROOTFS ($(du -sh "$ROOTFS" | cut -f1))"
sed 's/^/[build-rootfs]   /' "$ROOTFS/$MARKER_NAME" >&2
