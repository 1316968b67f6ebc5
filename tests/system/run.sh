#!/usr/bin/env bash
# make test-system: chatd under a real systemd (PID 1) in a container, checked as an admin would.
#
# Boots a debootstrapped Debian root filesystem with systemd-nspawn (own root, own network
# namespace with only lo, user namespace: see box.sh), never the host's root filesystem.
# Builds the dependency wheels on the host (pip wheel), copies them and the source tree in,
# runs `make install PIP_ARGS="--no-index --find-links ..."` in the box, then checks the
# service, the socket and the admin tools.  Skips (exit 0, saying why) where it cannot run.
#
# Variables: BOX_DIR (/var/tmp/chatd-system: rootfs and state), KEEP_BOX=1 (leave the box up),
#   PYTHON (the host Python with pip, default .venv/bin/python).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BOX="$HERE/box.sh"
export BOX_DIR=${BOX_DIR:-/var/tmp/chatd-system}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
STAGE="$ROOT/build/system"
PORT=1234

skip() { echo "SKIP: make test-system: $*"; exit 0; }
step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
B() { "$BOX" exec "$@"; }

[ "$(id -u)" = 0 ] || skip "needs root (systemd-nspawn boots the container)"
command -v systemd-nspawn >/dev/null || skip "no systemd-nspawn (apt-get install --no-install-recommends systemd-container)"
command -v nsenter >/dev/null || skip "no nsenter (util-linux)"
if [ ! -f "$BOX_DIR/rootfs/.chatd-system-rootfs" ]; then
    command -v debootstrap >/dev/null || skip "no debootstrap to build the container's root filesystem (apt-get install --no-install-recommends debootstrap)"
fi
[ -x "$PYTHON" ] || fail "no $PYTHON (run make test-system, which creates it)"

t0=$(date +%s)
step "root filesystem ($BOX_DIR/rootfs)"
"$HERE/build-rootfs.sh"

step "wheels of the dependencies, built on the host"
rm -rf "$STAGE"
mkdir -p "$STAGE/wheels" "$STAGE/src"
"$PYTHON" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
    >"$STAGE/requirements.txt"
# async-timeout: redis-py needs it on a Python before 3.11.3, as the box's Debian 12
# has (3.11.2), which the host's newer Python does not pull in.
(cd "$ROOT" && "$PYTHON" -m pip wheel --quiet --disable-pip-version-check \
    -w "$STAGE/wheels" -r "$STAGE/requirements.txt" "async-timeout>=4.0.3")
ls "$STAGE/wheels"
# The source tree as git sees it (tracked and new files, nothing ignored).
(cd "$ROOT" && git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -C "$STAGE/src" -xf -)

step "boot"
"$BOX" up >/dev/null
[ "${KEEP_BOX:-0}" = 1 ] || trap '"$BOX" down || true' EXIT
# Leftovers of an earlier run (the root filesystem persists between boots).
B systemctl stop chatd.socket chatd.service 2>/dev/null || true
B systemctl reset-failed chatd.socket chatd.service 2>/dev/null || true
B rm -rf /root/chatd-src /root/wheels /etc/chatd /usr/local/lib/chatd /var/lib/private/chatd \
    /etc/systemd/system/chatd.socket.d /etc/systemd/system/chatd.service.d \
    /usr/local/lib/systemd/system/chatd.service /usr/local/lib/systemd/system/chatd.socket
B sh -c 'userdel --remove admin1 2>/dev/null; groupdel chatd-admin 2>/dev/null; true'
"$BOX" copy "$STAGE/src" /root/chatd-src
"$BOX" copy "$STAGE/wheels" /root/wheels

step "make install (offline, from the wheels)"
B sh -c 'cd /root/chatd-src && make install PIP_ARGS="--no-index --find-links /root/wheels"'
B getent group chatd-admin || fail "make install did not create the group chatd-admin"
B systemctl daemon-reload
B systemd-analyze verify --man=no /usr/local/lib/systemd/system/chatd.service \
    /usr/local/lib/systemd/system/chatd.socket
CHECK="python3 /root/chatd-src/tests/system/chatcheck.py"

INV=
refresh_inv() {  # remember the current run of chatd.service (empty once it stopped)
    local inv
    inv=$(B systemctl show -p InvocationID --value chatd.service)
    if [ -n "$inv" ]; then INV=$inv; fi
}
journal() {  # the JSON events of the current (or, once stopped, the last) run of chatd.service
    B journalctl --no-pager -o cat "_SYSTEMD_INVOCATION_ID=$INV"
}
wait_event() {  # wait_event NAME [PYTHON-CONDITION on e]: a JSON event in this run's journal
    local name=$1 cond=${2:-True} i
    for i in $(seq 1 50); do
        refresh_inv
        if journal | "$PYTHON" -c '
import json, sys
name, cond = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if e.get("event") == name and eval(cond):
        sys.exit(0)
sys.exit(1)' "$name" "$cond"; then return 0; fi
        sleep 0.2
    done
    journal >&2
    fail "no $name event with $cond in the journal"
}

step "systemctl start chatd: active (running) with a STATUS line"
B systemctl start chatd
[ "$(B systemctl is-active chatd)" = active ] || fail "chatd is not active"
status=$(B systemctl status chatd --no-pager -l) || true
echo "$status"
grep -F 'Status: "0 users online, 0 connections"' <<<"$status" >/dev/null || fail "no STATUS line"
B test -S /run/chatd/admin.sock || fail "no control socket /run/chatd/admin.sock"
sockperm=$(B stat -c '%G %a' /run/chatd/admin.sock)
[ "$sockperm" = "chatd-admin 660" ] || fail "the control socket is $sockperm, not chatd-admin 660"
pid=$(B systemctl show -p MainPID --value chatd)
B grep -E '^(Uid|NoNewPrivs|Seccomp):' "/proc/$pid/status" | tee "$STAGE/proc-status"
grep -Eq '^Uid:\s+0\s' "$STAGE/proc-status" && fail "chatd runs as root"
grep -Eq '^NoNewPrivs:\s+1' "$STAGE/proc-status" || fail "NoNewPrivileges not applied"
grep -Eq '^Seccomp:\s+2' "$STAGE/proc-status" || fail "no system call filter"
exposure=$(B systemd-analyze security chatd --no-pager | sed -n 's/.*Overall exposure level for chatd.service: \([0-9.]*\).*/\1/p')
echo "systemd-analyze security chatd: $exposure"
awk -v x="$exposure" 'BEGIN { exit !(x != "" && x <= 2.0) }' || fail "exposure $exposure is over 2.0"

step "two clients chat through it"
B $CHECK chat "$PORT"

step "the chat client: a line piped into bob's chat reaches alice's"
B sh -c 'sleep 4 | chat -u alice --json 127.0.0.1 >/root/alice.jsonl 2>/root/alice.err' &
listener=$!
for i in $(seq 1 50); do  # alice is in once the welcome is written
    B grep -q '"welcome, alice' /root/alice.jsonl 2>/dev/null && break
    sleep 0.1
done
B sh -c 'echo "hello from the chat client" | chat -u bob 127.0.0.1' || fail "chat -u bob failed"
wait "$listener" || fail "alice's chat failed: $(B cat /root/alice.err)"
B cat /root/alice.jsonl
B grep -q '"from": "bob", "text": "hello from the chat client"' /root/alice.jsonl ||
    fail "alice did not get bob's line"

step "chatctl as root and as a member of chatd-admin sees who is online; an ordinary user is refused"
# Made a member while chatd runs: no reload, no sudo.
B sh -c 'useradd --create-home admin1 && usermod -aG chatd-admin admin1'
B $CHECK hold "$PORT" carol 5 &
holder=$!
for i in $(seq 1 50); do
    out=$(B chatctl list) || fail "chatctl list failed as root: $out"
    grep -q carol <<<"$out" && break
    sleep 0.1
done
echo "$out"
grep -q carol <<<"$out" || fail "chatctl list does not show carol"
out=$(B runuser -u admin1 -- chatctl list 2>&1) || fail "chatctl list failed for admin1, in chatd-admin: $out"
echo "admin1: $out"
grep -q carol <<<"$out" || fail "chatctl list as admin1 does not show carol"
for i in $(seq 1 30); do  # STATUS= is rate-limited to one a second
    status=$(B systemctl status chatd --no-pager -l) || true
    grep -qF 'Status: "1 user online, 1 connection"' <<<"$status" && break
    sleep 0.2
done
grep -F 'Status: ' <<<"$status"
grep -qF 'Status: "1 user online, 1 connection"' <<<"$status" || fail "STATUS does not count carol"
wait "$holder"
B sh -c 'id tester >/dev/null 2>&1 || useradd --create-home tester'
if out=$(B runuser -u tester -- chatctl list 2>&1); then
    fail "chatctl list worked for an ordinary user: $out"
fi
echo "tester: $out"
grep -q "permission denied" <<<"$out" || fail "the refusal does not say why"

step "systemctl reload chatd applies a changed setting"
B sed -i 's/^max_message_bytes: 4096$/max_message_bytes: 100/' /etc/chatd/chatd.yaml
B grep -q '^max_message_bytes: 100$' /etc/chatd/chatd.yaml || fail "could not edit the config"
B systemctl reload chatd
wait_event reload '"max_message_bytes" in e["applied"]'
B $CHECK too-long "$PORT" 200
[ "$(B systemctl show -p MainPID --value chatd)" = "$pid" ] || fail "reload restarted chatd"
status=$(B systemctl status chatd --no-pager -l) || true
grep -F 'Status: "' <<<"$status" || fail "no STATUS line after reload"

step "an invalid config on reload: rejected, chatd runs on and says so"
B cp /etc/chatd/chatd.yaml /root/chatd.yaml.good
B sh -c 'echo "max_clients: many" >> /etc/chatd/chatd.yaml'
B systemctl reload chatd
wait_event reload_failed '"max_clients" in e["error"]'
for i in $(seq 1 30); do
    status=$(B systemctl status chatd --no-pager -l) || true
    grep -qF '; reload failed, old config kept: ' <<<"$status" && break
    sleep 0.2
done
grep -F 'Status: ' <<<"$status"
grep -qF '; reload failed, old config kept: ' <<<"$status" || fail "STATUS does not tell of the failed reload"
[ "$(B systemctl is-active chatd)" = active ] || fail "chatd stopped on an invalid config"
B $CHECK too-long "$PORT" 200  # the old config (max_message_bytes: 100) still holds
B cp /root/chatd.yaml.good /etc/chatd/chatd.yaml

step "journalctl -u chatd: JSON events"
wait_event startup
wait_event join 'e["user"] == "alice"'
wait_event message 'e["user"] == "bob" and e["text"] == "hello from bob"'
wait_event leave
B journalctl -u chatd --no-pager -n 5 -o cat

step "Restart=on-failure: SIGKILL brings it back, with its bans (StateDirectory)"
B chatctl ban eve --reason "system test"
B kill -KILL "$pid"
for i in $(seq 1 50); do
    new=$(B systemctl show -p MainPID --value chatd)
    [ "$new" != 0 ] && [ "$new" != "$pid" ] && [ "$(B systemctl is-active chatd)" = active ] && break
    sleep 0.2
done
[ "$new" != 0 ] && [ "$new" != "$pid" ] || fail "chatd was not restarted after SIGKILL"
echo "restarted: pid $pid -> $new"
for i in $(seq 1 50); do
    bans=$(B chatctl bans 2>&1) && break
    sleep 0.1
done
echo "$bans"
grep -Eq "^eve +name +never .*system test$" <<<"$bans" || fail "the ban did not survive the restart"
B chatctl unban eve

step "the watchdog: pings keep chatd alive, a stuck loop gets it restarted"
B mkdir -p /etc/systemd/system/chatd.service.d
B sh -c 'printf "[Service]\nWatchdogSec=2s\n" > /etc/systemd/system/chatd.service.d/watchdog.conf'
B systemctl daemon-reload
B systemctl restart chatd
pid=$(B systemctl show -p MainPID --value chatd)
sleep 5  # two and a half watchdog intervals: without pings systemd would have killed it
[ "$(B systemctl show -p MainPID --value chatd)" = "$pid" ] || fail "chatd was restarted although it pinged"
B kill -STOP "$pid"  # the loop stops: no more pings
for i in $(seq 1 75); do
    new=$(B systemctl show -p MainPID --value chatd)
    [ "$new" != 0 ] && [ "$new" != "$pid" ] && [ "$(B systemctl is-active chatd)" = active ] && break
    sleep 0.2
done
[ "$new" != 0 ] && [ "$new" != "$pid" ] || fail "a stopped chatd was not restarted by the watchdog"
B journalctl -u chatd --no-pager -o cat | grep -i "watchdog timeout" | tail -n 1 ||
    fail "the journal does not say the watchdog fired"
echo "watchdog restart: pid $pid -> $new"
B rm -rf /etc/systemd/system/chatd.service.d
B systemctl daemon-reload
B systemctl restart chatd
new=$(B systemctl show -p MainPID --value chatd)

step "metrics.listen: the figures over HTTP from inside the sandbox (ProcSubset=pid), and chatctl metrics"
B sed -i 's/^  listen: ""$/  listen: "127.0.0.1:9464"/' /etc/chatd/chatd.yaml
B grep -q '^  listen: "127.0.0.1:9464"$' /etc/chatd/chatd.yaml || fail "could not set metrics.listen"
B systemctl stop chatd  # a fresh start, so the counts below are this test's alone
B systemctl start chatd
new=$(B systemctl show -p MainPID --value chatd)
wait_event startup 'e["pid"] == '"$new"' and e["metrics"] == "127.0.0.1:9464"'
B $CHECK chat "$PORT"
out=$(B python3 -c 'import urllib.request as u; print(u.urlopen("http://127.0.0.1:9464/metrics", timeout=10).read().decode())') ||
    fail "GET /metrics failed"
for m in 'chatd_joins_total 2.0' 'chatd_messages_total 1.0' 'chatd_left_total{reason="quit"} ' \
    'chatd_process_open_fds ' 'chatd_process_resident_memory_bytes ' 'chatd_process_max_fds '; do
    grep -qF "$m" <<<"$out" || fail "GET /metrics lacks $m: $out"
done
grep -E '^chatd_(users|joins_total|process_open_fds) ' <<<"$out"
B chatctl metrics | grep -qx 'chatd_joins_total 2.0' || fail "chatctl metrics does not count the joins"

step "systemctl restart chatd, twice: the same connections chat on, nothing lost"
B rm -rf /root/restarts && B mkdir /root/restarts
B $CHECK restarts "$PORT" /root/restarts >"$STAGE/restarts.out" 2>&1 &
checker=$!
for i in $(seq 1 50); do B test -e /root/restarts/ready && break; sleep 0.1; done
B test -e /root/restarts/ready || fail "the clients did not join"
before=$(B systemctl show -p MainPID --value chatd)
stored=$(B systemctl show -p NFileDescriptorStore --value chatd)
echo "descriptors in the store: $stored"
[ "${stored:-0}" -ge 5 ] || fail "the fd store holds $stored descriptors, not listener, control and 3 clients"
if B systemd-analyze fdstore chatd >"$STAGE/fdstore" 2>&1; then cat "$STAGE/fdstore"; else echo "(no systemd-analyze fdstore in systemd $(B systemctl --version | head -n1 | cut -d' ' -f2))"; fi
for round in 1 2; do
    sleep 1
    B systemctl restart chatd
    after=$(B systemctl show -p MainPID --value chatd)
    [ "$after" != "$before" ] || fail "restart $round did not start a new chatd"
    wait_event handover_taken 'e["users"] == 3'
    echo "restart $round: pid $before -> $after"
    before=$after
done
sleep 1
B touch /root/restarts/done
wait "$checker" || fail "across the restarts: $(cat "$STAGE/restarts.out")"
cat "$STAGE/restarts.out"

step "a restart into a config that fails: the unit fails, saying why, and the clients are told"
B cp /etc/chatd/chatd.yaml /root/chatd.yaml.good
B $CHECK goodbye "$PORT" "the server could not restart" >"$STAGE/goodbye.out" 2>&1 &
checker=$!
sleep 1
B sed -i 's/^max_clients: .*/max_clients: many/' /etc/chatd/chatd.yaml
B systemctl restart chatd || true
wait "$checker" || fail "the client was not told: $(cat "$STAGE/goodbye.out")"
cat "$STAGE/goodbye.out"
for i in $(seq 1 30); do [ "$(B systemctl is-active chatd || true)" = failed ] && break; sleep 0.2; done
[ "$(B systemctl is-active chatd || true)" = failed ] || fail "chatd is $(B systemctl is-active chatd) after a restart into a bad config, not failed"
B journalctl -u chatd --no-pager -o cat | grep -F "max_clients: expected an integer" | tail -n 1 ||
    fail "the journal does not say why"
B cp /root/chatd.yaml.good /etc/chatd/chatd.yaml
B systemctl reset-failed chatd
B systemctl start chatd
new=$(B systemctl show -p MainPID --value chatd)

step "systemctl stop after a restart: everyone is told goodbye"
B systemctl restart chatd
new=$(B systemctl show -p MainPID --value chatd)
wait_event startup 'e["pid"] == '"$new"
B $CHECK goodbye "$PORT" "the server is shutting down" >"$STAGE/goodbye.out" 2>&1 &
checker=$!
sleep 1

step "systemctl stop chatd: inactive, control socket gone"
wait_event startup 'e["pid"] == '"$new"
B systemctl stop chatd
st=$(B systemctl is-active chatd || true)
[ "$st" = inactive ] || fail "chatd is $st after stop"
B test ! -e /run/chatd || fail "/run/chatd (the control socket's directory) is still there"
wait_event shutdown
wait "$checker" || fail "stopped after a restart, the client was not told: $(cat "$STAGE/goodbye.out")"
cat "$STAGE/goodbye.out"
stored=$(B systemctl show -p NFileDescriptorStore --value chatd)
[ "${stored:-0}" = 0 ] || fail "the fd store still holds $stored descriptors after stop"

step "socket activation: chatd.socket starts chatd on the first connection"
# A second, privileged port (below 1024) that the unprivileged chatd serves all the same.
B mkdir -p /etc/systemd/system/chatd.socket.d
B sh -c 'printf "[Socket]\nListenStream=127.0.0.1:99\n" > /etc/systemd/system/chatd.socket.d/low-port.conf'
B systemctl daemon-reload
B systemctl start chatd.socket
st=$(B systemctl is-active chatd.service || true)
[ "$st" = inactive ] || fail "chatd.service is $st before any connection"
B $CHECK wait "$PORT" 10
[ "$(B systemctl is-active chatd.service)" = active ] || fail "the connection did not start chatd"
B systemctl show -p TriggeredBy --value chatd.service | grep -q chatd.socket || fail "not triggered by chatd.socket"
wait_event startup 'e["listen"] == ["127.0.0.1:'"$PORT"'", "127.0.0.1:99"]'
B $CHECK chat 99
B systemctl status chatd.service --no-pager -l | head -n 8 || true

step "socket activation: a connection while chatd is stopped waits, then is served"
B systemctl stop chatd.service
[ "$(B systemctl is-active chatd.socket)" = active ] || fail "chatd.socket stopped with the service"
B $CHECK wait "$PORT" 10
[ "$(B systemctl is-active chatd.service)" = active ] || fail "chatd was not started again"
B systemctl stop chatd.socket chatd.service
B rm -rf /etc/systemd/system/chatd.socket.d
B systemctl daemon-reload
for u in chatd.socket chatd.service; do
    st=$(B systemctl is-active "$u" || true)
    [ "$st" = inactive ] || fail "$u is $st after stop"
done

step "make uninstall"
B sh -c 'cd /root/chatd-src && make uninstall'
B test ! -e /usr/local/bin/chatd || fail "chatd still installed"
B test ! -e /usr/local/lib/sysusers.d/chatd.conf || fail "sysusers.d/chatd.conf still installed"
B getent group chatd-admin >/dev/null || fail "make uninstall removed the group chatd-admin"

echo
echo "ALL SYSTEM TESTS PASSED in $(( $(date +%s) - t0 )) s"
