# Shared helpers for the benchmark scripts; source it, do not run it.
#
# Every helper that starts something (a server, a mount, a namespace) records
# it, and bench_cleanup (installed as the EXIT trap by bench_init) undoes
# everything in reverse order. Loops that wait are bounded in count and time.

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/../.." && pwd)
BIN=${ESGZ_NBD:-$REPO/target/release/esgz-nbd}
OUT=${BENCH_OUT:-$REPO/target/bench}
SHARED=${ESGZ_SHARED:-$(cd "$REPO/.." && pwd)/shared}
[ -d "$SHARED/images" ] || SHARED=/work/shared
DEBIAN_OCI=$SHARED/images/debian-bookworm-minbase/oci
# The system interpreter has the libnbd bindings (python3-libnbd).
PY_NBD=/usr/bin/python3

# Network namespaces and addresses of the emulated link. Both veth ends live in
# namespaces created here: the registry in NS_SRV, the proxy's upstream side
# in NS_CLI.
NS_SRV=esgzb-srv
NS_CLI=esgzb-cli
VETH_SRV=esgzb-s
VETH_CLI=esgzb-c
ADDR_SRV=10.200.0.2
ADDR_CLI=10.200.0.1
REGISTRY_PORT=5000

CLEANUP_STACK=()

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
now_ns() { date +%s%N; }
ms_since() { echo $(( ($(now_ns) - $1) / 1000000 )); }

# Push a cleanup command; it runs at exit, last pushed first.
on_exit() { CLEANUP_STACK+=("$*"); }

bench_cleanup() {
  set +e
  local i
  for (( i=${#CLEANUP_STACK[@]}-1; i>=0; i-- )); do
    eval "${CLEANUP_STACK[$i]}" >/dev/null 2>&1
  done
  CLEANUP_STACK=()
}

bench_init() {
  [ "$(id -u)" = 0 ] || die "run as root: the benchmarks mount ext4, use loop devices and create network namespaces"
  [ -x "$BIN" ] || die "$BIN not found; build it with: cargo build --release"
  mkdir -p "$OUT"
  WORK=$(mktemp -d /tmp/esgz-bench.XXXXXX)
  on_exit "rm -rf '$WORK'"
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
}

# Stop a process we started: SIGTERM, then SIGKILL after 5 s.
stop_pid() {
  local pid=$1 i
  kill "$pid" 2>/dev/null || return 0
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  return 0
}

wait_for_file() { # PATH TIMEOUT_S [PID]
  local path=$1 limit=$(( $2 * 100 )) pid=${3:-} i
  for (( i=0; i<limit; i++ )); do
    [ -e "$path" ] && return 0
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    sleep 0.01
  done
  return 1
}

# Create the two namespaces joined by a veth pair, each end rate-limited.
netns_up() {
  ip netns add "$NS_SRV"
  on_exit "ip netns del $NS_SRV"
  ip netns add "$NS_CLI"
  on_exit "ip netns del $NS_CLI"
  ip -n "$NS_CLI" link add "$VETH_CLI" type veth peer name "$VETH_SRV" netns "$NS_SRV"
  ip -n "$NS_CLI" addr add "$ADDR_CLI/30" dev "$VETH_CLI"
  ip -n "$NS_SRV" addr add "$ADDR_SRV/30" dev "$VETH_SRV"
  ip -n "$NS_CLI" link set lo up
  ip -n "$NS_SRV" link set lo up
  ip -n "$NS_CLI" link set "$VETH_CLI" up
  ip -n "$NS_SRV" link set "$VETH_SRV" up
}

# Set the rate of both directions of the link, e.g. 200mbit or 1gbit. A
# 32 kbit bucket holds a 1 Gbit/s link to about 300 Mbit/s on this kernel
# (measured with curl through the link), so rates above 200 Mbit/s get a
# 1 Mbit bucket.
link_burst() {
  case $1 in
    *gbit) echo 1mbit ;;
    *) echo 32kbit ;;
  esac
}

link_rate() {
  local rate=$1 burst
  burst=$(link_burst "$rate")
  ip netns exec "$NS_SRV" tc qdisc replace dev "$VETH_SRV" root tbf rate "$rate" burst "$burst" latency 400ms
  ip netns exec "$NS_CLI" tc qdisc replace dev "$VETH_CLI" root tbf rate "$rate" burst "$burst" latency 400ms
}

link_rate_command() {
  echo "tc qdisc replace dev VETH root tbf rate RATE burst BURST latency 400ms on both veth ends (BURST 32kbit at 200mbit, 1mbit at 1gbit)"
}

# Start docker-registry inside NS_SRV with storage under $WORK/registry.
registry_up() {
  local storage=$WORK/registry
  mkdir -p "$storage"
  cat > "$storage/config.yml" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $storage/data}}
http: {addr: $ADDR_SRV:$REGISTRY_PORT}
EOF
  ip netns exec "$NS_SRV" docker-registry serve "$storage/config.yml" >"$storage/registry.log" 2>&1 &
  REGISTRY_PID=$!
  on_exit "stop_pid $REGISTRY_PID"
}

# Start a delaying proxy on 127.0.0.1:PORT whose upstream side is in NS_CLI.
proxy_up() { # PORT ONE_WAY_DELAY_MS
  local port=$1 delay=$2 ready=$WORK/proxy.$1.ready pid
  python3 "$BENCH_DIR/wanproxy.py" --listen "127.0.0.1:$port" --connect "$ADDR_SRV:$REGISTRY_PORT" \
    --delay-ms "$delay" --netns "$NS_CLI" --ready-file "$ready" 2>>"$WORK/proxy.$port.log" &
  pid=$!
  on_exit "stop_pid $pid"
  wait_for_file "$ready" 10 "$pid" || die "proxy on port $port did not start; see $WORK/proxy.$port.log"
}

wait_registry() { # PORT
  local i code
  for i in $(seq 1 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/v2/" || true)
    [ "$code" = 200 ] && return 0
    sleep 0.1
  done
  die "registry behind 127.0.0.1:$1 did not respond within 10 s; log: $WORK/registry/registry.log"
}

# Set up the emulated link and push the Debian image. Sets SETUP_PORT (no
# delay) and WAN_PORT (DELAY_MS one way).
wan_up() { # DELAY_MS
  SETUP_PORT=${SETUP_PORT:-15800}
  WAN_PORT=${WAN_PORT:-15801}
  netns_up
  link_rate 1gbit
  registry_up
  proxy_up "$SETUP_PORT" 0
  proxy_up "$WAN_PORT" "$1"
  wait_registry "$SETUP_PORT"
  skopeo copy -q --dest-tls-verify=false "oci:$DEBIAN_OCI:latest" \
    "docker://127.0.0.1:$SETUP_PORT/debian:latest" >/dev/null
}

# Serve IMAGE with a fresh cache. Sets SERVE_PID, SOCK, STATS, CACHE.
serve_start() { # IMAGE TAG [extra args]
  local image=$1 tag=$2
  shift 2
  SOCK=$WORK/$tag.sock
  STATS=$WORK/$tag.stats.json
  CACHE=${CACHE_DIR:-$WORK/$tag.cache}
  rm -f "$SOCK" "$STATS"
  "$BIN" -q serve "$image" --socket "$SOCK" --cache-dir "$CACHE" --stats-file "$STATS" "$@" \
    >>"$WORK/serve.log" 2>&1 &
  SERVE_PID=$!
  on_exit "stop_pid $SERVE_PID"
}

serve_stop() {
  stop_pid "$SERVE_PID"
}

# Read counters from the stats file as "startup_bytes startup_requests
# store_bytes store_requests".
stats_fields() {
  python3 - "$1" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
st, so = s.get("startup", {}), s.get("store", {})
print(st.get("bytes_fetched", 0), st.get("range_requests", 0),
      so.get("bytes_fetched", 0), so.get("range_requests", 0))
EOF
}

loadavg() { cut -d' ' -f1 /proc/loadavg; }

vm_hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# Mount the NBD export at SOCK through nbdfuse and a read-only loop device.
# With a third argument `unbuffered` the loop device reads with direct I/O
# and no read-ahead, so the server sees only the blocks the filesystem
# reads. Sets MNT.
mount_nbd() { # SOCK TAG [unbuffered]
  local sock=$1 tag=$2 mode=${3:-} fuse=$WORK/$2.fuse loop pid
  MNT=$WORK/$tag.mnt
  mkdir -p "$fuse" "$MNT"
  nbdfuse --readonly "$fuse/disk" "nbd+unix:///?socket=$sock" &
  pid=$!
  on_exit "umount '$fuse' || fusermount3 -u '$fuse'; wait $pid"
  wait_for_file "$fuse/disk" 30 "$pid" || die "nbdfuse did not expose $fuse/disk"
  if [ "$mode" = unbuffered ]; then
    loop=$(losetup --find --show --read-only --direct-io=on "$fuse/disk")
    blockdev --setra 0 "$loop"
  else
    loop=$(losetup --find --show --read-only "$fuse/disk")
  fi
  on_exit "losetup -d $loop"
  mount -t ext4 -o ro,noload "$loop" "$MNT"
  on_exit "umount '$MNT'"
}

# Run and drop the cleanup entries pushed after index N (see cleanup_mark),
# so that one run's servers and mounts are gone before the next run starts.
bench_cleanup_tail() {
  local keep=$1 i
  for (( i=${#CLEANUP_STACK[@]}-1; i>=keep; i-- )); do
    eval "${CLEANUP_STACK[$i]}" >/dev/null 2>&1 || true
    unset 'CLEANUP_STACK[i]'
  done
  CLEANUP_STACK=("${CLEANUP_STACK[@]}")
}

cleanup_mark() { echo "${#CLEANUP_STACK[@]}"; }

# The files `bash -c 'dpkg --version; ls /'` opens, in first-access order.
WORKLOAD_FILES=(
  usr/bin/bash
  etc/ld.so.cache
  usr/lib/x86_64-linux-gnu/libtinfo.so.6.4
  usr/lib/x86_64-linux-gnu/libc.so.6
  etc/nsswitch.conf
  etc/passwd
  usr/bin/dpkg
  usr/lib/x86_64-linux-gnu/libmd.so.0.0.5
  usr/lib/x86_64-linux-gnu/libselinux.so.1
  usr/lib/x86_64-linux-gnu/libpcre2-8.so.0.11.2
  etc/dpkg/dpkg.cfg
  usr/bin/ls
)

run_workload() { # ROOT
  local f
  for f in "${WORKLOAD_FILES[@]}"; do
    cat "$1/$f" >/dev/null || die "workload: reading $1/$f failed"
  done
}

machine_json() {
  python3 - <<'EOF'
import json, os, platform, re
model = ""
with open("/proc/cpuinfo") as f:
    for line in f:
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
mem = 0
with open("/proc/meminfo") as f:
    for line in f:
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) // 1024
print(json.dumps({"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
                  "mem_mib": mem}))
EOF
}

git_rev() { git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown; }
