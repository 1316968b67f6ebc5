#!/usr/bin/env bash
# box.sh - boot a real systemd (PID 1) in an isolated systemd-nspawn container
# built by build-rootfs.sh, and drive it from the host.
#
#   box.sh up                 boot in the background, wait for running/degraded, print container PID 1 (host PID)
#   box.sh exec CMD [ARG...]  run CMD inside the box (all its namespaces), exit with CMD's status
#   box.sh shell              interactive bash inside the box
#   box.sh copy SRC DST       copy a host file/dir into the box; DST is a path inside the box
#                             (DST ending in / = copy into that dir; works whether the box is up or down)
#   box.sh status             show whether it runs, PIDs, systemctl is-system-running
#   box.sh down               poweroff inside, wait; SIGTERM/SIGKILL by PID only if needed; verify cleanup
#
# Isolation: own root filesystem (never the host's), own mount/PID/UTS/IPC/cgroup namespaces, a
# user namespace (default; box root = unprivileged host UID) and a private network namespace
# containing only 'lo'. Nothing the box runs can touch the host's /tmp,
# network or mounts. Host side effects: cgroups $BOX_NAME/{supervisor,payload} under the host's
# cgroup roots (removed by 'down') and empty dirs /run/systemd/nspawn{,-uid} (removed by 'down' if empty).
#
# Variables: BOX_DIR (/var/tmp/chatd-system), ROOTFS ($BOX_DIR/rootfs), BOX_STATE ($BOX_DIR/state),
#   BOX_NAME (chatd-system), BOX_CGROUP (unified|hybrid|legacy: cgroup layout the box sees, default unified),
#   BOX_USERNS (1 = default: box root is an unprivileged host UID via --private-users=pick with an
#     idmapped mount, so the rootfs ownership is never rewritten; 0 = no user namespace),
#   BOX_BPF (0 = default; 1 = let the box use bpf(), needed for IPAddressDeny=/IPAddressAllow= to be
#     enforced; implies BOX_USERNS=0 because cgroup-BPF needs host-level privilege -> weaker isolation),
#   BOX_VOLATILE (0 = default, changes persist in the rootfs; 1 = --volatile=overlay: every boot starts
#     from the pristine rootfs, writes go to a tmpfs and vanish at 'down'; implies BOX_USERNS=0 because
#     nspawn cannot idmap the overlay; nspawn briefly creates an empty /tmp/nspawn-volatile-XXXXXX on the host),
#   BOOT_TIMEOUT (90 s), DOWN_TIMEOUT (30 s), BOX_NSPAWN_ARGS (extra systemd-nspawn args, word-split).
set -euo pipefail

BOX_DIR=${BOX_DIR:-/var/tmp/chatd-system}
ROOTFS=${ROOTFS:-$BOX_DIR/rootfs}
STATE=${BOX_STATE:-$BOX_DIR/state}
BOX_NAME=${BOX_NAME:-chatd-system}
BOX_CGROUP=${BOX_CGROUP:-unified}
BOX_USERNS=${BOX_USERNS:-1}
BOX_BPF=${BOX_BPF:-0}
BOX_VOLATILE=${BOX_VOLATILE:-0}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-90}
DOWN_TIMEOUT=${DOWN_TIMEOUT:-30}
INNER_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { printf '[box] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
case "$ROOTFS" in /*) ;; *) die "ROOTFS must be absolute" ;; esac
ROOTFS=$(realpath -m "$ROOTFS")
[ "$ROOTFS" != / ] || die "refusing to boot the host's root filesystem"

# ---------------------------------------------------------------- helpers
alive() {  # alive PID -> true if it exists and is not a zombie
    local p=$1 st
    [ -n "$p" ] && [ -r "/proc/$p/stat" ] || return 1
    st=$(sed -E 's/^.*\) (.).*$/\1/' "/proc/$p/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}
is_our_nspawn() {  # PID is a systemd-nspawn booting our ROOTFS
    local p=$1
    alive "$p" || return 1
    [ "$(readlink "/proc/$p/exe" 2>/dev/null)" = "$(readlink -f "$(command -v systemd-nspawn)")" ] || return 1
    tr '\0' '\n' <"/proc/$p/cmdline" 2>/dev/null | grep -qxF -- "--directory=$ROOTFS"
}
nspawn_pid() {
    local p
    p=$(cat "$STATE/nspawn.pid" 2>/dev/null || true)
    is_our_nspawn "$p" && echo "$p"
}
pid1() {  # host PID of the container's PID 1: the child of nspawn that lives in another PID namespace
    local np=$1 c self
    self=$(readlink /proc/self/ns/pid)
    for c in $(ps -o pid= --ppid "$np" 2>/dev/null); do
        if alive "$c" && [ "$(readlink "/proc/$c/ns/pid" 2>/dev/null)" != "$self" ] &&
           [ "$(cat "/proc/$c/comm" 2>/dev/null)" = systemd ]; then echo "$c"; return 0; fi
    done
    return 0
}
cgroup_dirs() {  # the host cgroup dirs the launcher is placed in (one per systemd-relevant hierarchy)
    if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then
        echo "/sys/fs/cgroup/$BOX_NAME"
    else
        [ "$(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null)" = cgroup2fs ] && echo "/sys/fs/cgroup/unified/$BOX_NAME"
        [ -d /sys/fs/cgroup/systemd ] && echo "/sys/fs/cgroup/systemd/$BOX_NAME"
    fi
    return 0
}
inbox() {  # run a command inside the running box
    local p=$1; shift
    nsenter --target "$p" --all --root --wd -- /usr/bin/env -i PATH="$INNER_PATH" HOME=/root \
        LANG=C.UTF-8 TERM="${TERM:-dumb}" SYSTEMD_PAGER=cat "$@"
}
inroot() {  # run a command with the box's filesystem as root: inside the box if up, else chroot
    local np p
    np=$(nspawn_pid || true)
    p=${np:+$(pid1 "$np")}
    if [ -n "$p" ]; then inbox "$p" "$@"
    else chroot "$ROOTFS" /usr/bin/env -i PATH="$INNER_PATH" HOME=/root LANG=C.UTF-8 "$@"; fi
}
require_up() {
    NPID=$(nspawn_pid || true)
    [ -n "$NPID" ] || die "box is not running (box.sh up)"
    PID1=$(pid1 "$NPID")
    [ -n "$PID1" ] || die "nspawn $NPID runs but container PID 1 not found"
}

# ---------------------------------------------------------------- subcommands
cmd_up() {
    [ -x "$ROOTFS/lib/systemd/systemd" ] || die "no bootable rootfs at $ROOTFS (run build-rootfs.sh)"
    local np p
    np=$(nspawn_pid || true)
    if [ -n "$np" ]; then
        p=$(pid1 "$np"); log "already running: nspawn=$np pid1=$p"; echo "$p"; return 0
    fi
    command -v systemd-nspawn >/dev/null || die "systemd-nspawn missing (apt-get install --no-install-recommends systemd-container)"
    mkdir -p "$STATE"
    rm -f "$STATE/nspawn.pid" "$STATE/pid1" "$STATE/pidns"

    local uh
    case "$BOX_CGROUP" in
        unified) uh=1 ;;   # box sees a pure cgroup2 tree (like a modern host)
        legacy) uh=0 ;;    # box sees cgroup v1 only
        hybrid) uh= ;;     # nspawn's auto-detection (hybrid on a hybrid host)
        *) die "BOX_CGROUP must be unified|hybrid|legacy" ;;
    esac
    local extra=()
    if [ "$BOX_BPF" = 1 ]; then
        [ "$BOX_USERNS" = 1 ] && log "BOX_BPF=1: disabling the user namespace (cgroup-BPF needs host privilege)"
        BOX_USERNS=0
        extra+=(--system-call-filter=bpf)
    fi
    if [ "$BOX_VOLATILE" = 1 ]; then
        [ "$BOX_USERNS" = 1 ] && log "BOX_VOLATILE=1: disabling the user namespace (nspawn cannot idmap the overlay)"
        BOX_USERNS=0
        extra+=(--volatile=overlay)
    fi
    [ "$BOX_USERNS" = 1 ] && extra+=(--private-users=pick --private-users-ownership=map)
    local cgs=() d
    while read -r d; do [ -n "$d" ] && cgs+=("$d"); done < <(cgroup_dirs)
    for d in "${cgs[@]}"; do mkdir -p "$d"; done

    local t0 t1
    t0=$(date +%s.%N)
    : >"$STATE/nspawn.log"
    # The launcher moves itself into our own cgroup(s), records its PID and execs nspawn (same PID).
    # --keep-unit --register=no: no host systemd/machined/D-Bus needed (the host's PID 1 is not systemd);
    # nspawn then creates $BOX_NAME/{supervisor,payload} sub-cgroups itself.
    env BOX_CGS="${cgs[*]}" BOX_PIDFILE="$STATE/nspawn.pid" ${uh:+SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=$uh} \
    setsid /bin/bash -c '
        for d in $BOX_CGS; do echo $$ > "$d/cgroup.procs"; done
        echo $$ > "$BOX_PIDFILE"
        unset BOX_CGS BOX_PIDFILE
        exec "$@"' box-launcher \
        systemd-nspawn --directory="$ROOTFS" --machine="$BOX_NAME" --hostname="$BOX_NAME" --boot \
            --register=no --keep-unit --private-network \
            --link-journal=no --resolv-conf=off --timezone=off --console=read-only \
            "${extra[@]}" ${BOX_NSPAWN_ARGS:-} \
        </dev/null >>"$STATE/nspawn.log" 2>&1 &
    disown || true

    # wait for the nspawn PID and the container PID 1
    np= p=
    local i
    for i in $(seq 1 100); do
        np=$(nspawn_pid || true)
        [ -n "$np" ] && p=$(pid1 "$np")
        [ -n "$p" ] && break
        sleep 0.1
    done
    if [ -z "$p" ]; then
        tail -n 30 "$STATE/nspawn.log" >&2
        die "container PID 1 did not appear (log: $STATE/nspawn.log)${np:+; nspawn $np may still run: box.sh down}"
    fi
    echo "$p" >"$STATE/pid1"
    readlink "/proc/$p/ns/pid" >"$STATE/pidns"

    # wait for boot to finish
    local s=""
    for i in $(seq 1 $((BOOT_TIMEOUT * 2))); do
        if ! alive "$np"; then tail -n 30 "$STATE/nspawn.log" >&2; die "nspawn exited during boot"; fi
        s=$(inbox "$p" systemctl is-system-running 2>/dev/null || true)
        case "$s" in running|degraded) break ;; esac
        sleep 0.5
    done
    t1=$(date +%s.%N)
    case "$s" in
        running|degraded) ;;
        *) tail -n 30 "$STATE/nspawn.log" >&2; die "boot did not finish within ${BOOT_TIMEOUT}s (state: ${s:-unknown}); box left running, use 'box.sh down'" ;;
    esac
    [ "$s" = degraded ] && inbox "$p" systemctl --failed --no-legend >&2 || true
    log "up: state=$s cgroup=$BOX_CGROUP userns=$BOX_USERNS bpf=$BOX_BPF volatile=$BOX_VOLATILE nspawn=$np pid1=$p boot=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')s log=$STATE/nspawn.log"
    echo "$p"
}

cmd_exec() {
    [ $# -gt 0 ] || die "usage: box.sh exec CMD [ARG...]"
    require_up
    inbox "$PID1" "$@"
}

cmd_shell() {
    require_up
    inbox "$PID1" /bin/bash -l
}

cmd_copy() {
    [ $# -eq 2 ] || die "usage: box.sh copy SRC DST   (DST: path inside the box; trailing / = into that dir)"
    local src=$1 dst=$2 tgt
    [ -e "$src" ] || die "no such file: $src"
    case "$dst" in /*) ;; *) die "DST must be an absolute path inside the box" ;; esac
    case "$dst" in */) tgt="${dst%/}/$(basename "$src")" ;; *) tgt=$dst ;; esac
    # Streams through tar/cat running *inside* the box's root (nsenter when up, chroot when down),
    # so symlinks in the rootfs are resolved inside it and can never redirect writes to the host.
    if [ -d "$src" ]; then
        tar -C "$src" -cf - . | inroot /bin/sh -c 'mkdir -p "$1" && tar -C "$1" --no-same-owner -xf -' sh "$tgt"
    else
        local mode
        mode=$(stat -c %a "$src")
        inroot /bin/sh -c 'mkdir -p "$(dirname "$1")" && cat >"$1" && chmod "$2" "$1"' sh "$tgt" "$mode" <"$src"
    fi
    log "copied $src -> box:$tgt"
}

cmd_status() {
    local np p
    np=$(nspawn_pid || true)
    if [ -z "$np" ]; then echo "down"; return 0; fi
    p=$(pid1 "$np")
    echo "up nspawn=$np pid1=$p state=$(inbox "$p" systemctl is-system-running 2>/dev/null || true)"
}

cmd_down() {
    local np p ns problems=0 i d
    np=$(nspawn_pid || true)
    ns=$(cat "$STATE/pidns" 2>/dev/null || true)
    if [ -n "$np" ]; then
        p=$(pid1 "$np")
        [ -z "$ns" ] && [ -n "$p" ] && ns=$(readlink "/proc/$p/ns/pid")
        if [ -n "$p" ]; then
            log "poweroff inside the box"
            inbox "$p" systemctl poweroff --no-block || log "poweroff request failed"
        fi
        for i in $(seq 1 $((DOWN_TIMEOUT * 2))); do alive "$np" || break; sleep 0.5; done
        if alive "$np"; then
            log "still running after ${DOWN_TIMEOUT}s: SIGTERM to nspawn $np (orderly halt)"
            kill -TERM "$np" 2>/dev/null || true
            for i in $(seq 1 30); do alive "$np" || break; sleep 0.5; done
        fi
        if alive "$np"; then
            log "still running: SIGKILL container pid1 ${p:-?} and nspawn $np"
            [ -n "$p" ] && alive "$p" && kill -KILL "$p" 2>/dev/null || true
            kill -KILL "$np" 2>/dev/null || true
            for i in $(seq 1 20); do alive "$np" || break; sleep 0.5; done
        fi
        alive "$np" && { log "nspawn $np is still alive"; problems=1; }
    else
        log "box not running (no live nspawn for $ROOTFS)"
    fi

    # ---- verify nothing is left
    if [ -n "$ns" ]; then
        local left=""
        for d in /proc/[0-9]*; do
            [ "$(readlink "$d/ns/pid" 2>/dev/null)" = "$ns" ] && alive "${d#/proc/}" && left="$left ${d#/proc/}"
        done
        [ -n "$left" ] && { log "processes still in the box's PID namespace:$left"; problems=1; }
    fi
    while read -r d; do
        [ -n "$d" ] && [ -d "$d" ] || continue
        if [ -n "$(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null)" ]; then
            log "processes still in cgroup $d:"; find "$d" -name cgroup.procs -exec cat {} + >&2; problems=1
        else
            find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
            [ -d "$d" ] && { log "could not remove cgroup $d"; problems=1; }
        fi
    done < <(cgroup_dirs)
    # empty bookkeeping dirs nspawn creates on the host (it cannot clean them when /run is not tmpfs)
    rmdir "/run/systemd/nspawn/propagate/$BOX_NAME" /run/systemd/nspawn/propagate \
          /run/systemd/nspawn/locks /run/systemd/nspawn /run/systemd/nspawn-uid 2>/dev/null || true
    if awk -v p="$ROOTFS" '$2 == p || index($2, p "/") == 1 {f=1} END{exit !f}' /proc/self/mounts; then
        log "host mounts under $ROOTFS remain"; problems=1
    fi
    if [ "$problems" = 0 ]; then
        rm -f "$STATE/nspawn.pid" "$STATE/pid1" "$STATE/pidns"
        log "down: clean (no box processes, cgroups removed, no mounts)"
    else
        die "down: leftovers found (see above); nothing else was touched"
    fi
}

sub=${1:-}; [ $# -gt 0 ] && shift
case "$sub" in
    up) cmd_up ;;
    exec) cmd_exec "$@" ;;
    shell) cmd_shell ;;
    copy) cmd_copy "$@" ;;
    status) cmd_status ;;
    down) cmd_down ;;
    *) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 2 ;;
esac
