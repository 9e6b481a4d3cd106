#!/usr/bin/env bash
# The record-then-prioritize loop on the Debian image: record the files that
# `chroot MNT /bin/sh -c 'dpkg --version'` reads, rebuild the image with
# `convert --prioritize`, then cold-start the same command on the
# unprioritized and the prioritized image and count the registry traffic.
#
#   record.sh [REPS]        (env: DELAY_MS=10)
#
# The registry is docker-registry on 127.0.0.1; wanproxy.py in front of it
# adds DELAY_MS one way, so each request costs a round trip. Writes one JSON
# line per cold run to $OUT/record.jsonl, the commands to
# $OUT/record.meta.json and the recorded list to $OUT/record.access.txt.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

REPS=${1:-5}
DELAY_MS=${DELAY_MS:-10}
RESULTS=$OUT/record.jsonl
WORKLOAD="dpkg --version"

bench_init
: > "$RESULTS"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

REG_PORT=$(free_port)
REG_PID=$("$SHARED/scripts/start-registry.sh" "$REG_PORT" "$WORK/registry")
on_exit "stop_pid $REG_PID"
WAN_PORT=$(free_port)
python3 "$BENCH_DIR/wanproxy.py" --listen "127.0.0.1:$WAN_PORT" --connect "127.0.0.1:$REG_PORT" \
  --delay-ms "$DELAY_MS" --ready-file "$WORK/proxy.ready" 2>>"$WORK/proxy.log" &
PROXY_PID=$!
on_exit "stop_pid $PROXY_PID"
wait_for_file "$WORK/proxy.ready" 10 "$PROXY_PID" || die "wanproxy.py did not start; see $WORK/proxy.log"

PLAIN=127.0.0.1:$REG_PORT/debian:plain
PRIO=127.0.0.1:$REG_PORT/debian:prioritized
log "converting the Debian image without a prioritized list"
"$BIN" -q convert --force "oci:$DEBIAN_OCI:latest" "$PLAIN" >/dev/null

# Serve IMAGE with a fresh cache, mount it (MOUNT_MODE=unbuffered turns
# off read-ahead) and run the workload in a chroot. Sets RUN_MS (serve
# start to workload end) and WORK_MS (the workload alone).
run_once() { # IMAGE TAG [serve args]
  local image=$1 tag=$2 t0 t1
  shift 2
  CACHE_DIR=$WORK/$tag.cache
  rm -rf "$CACHE_DIR"
  t0=$(now_ns)
  serve_start "$image" "$tag" "$@"
  wait_for_file "$SOCK" 60 "$SERVE_PID" || die "the server of $image did not open $SOCK; see $WORK/serve.log"
  mount_nbd "$SOCK" "$tag" "${MOUNT_MODE:-}"
  t1=$(now_ns)
  chroot "$MNT" /bin/sh -c "$WORKLOAD" >/dev/null || die "chroot $MNT /bin/sh -c '$WORKLOAD' failed"
  RUN_MS=$(ms_since "$t0")
  WORK_MS=$(ms_since "$t1")
}

# The record run reads from the registry directly, because its timing does not matter.
mark=$(cleanup_mark)
# Kernel read-ahead would add the neighbours of each file read to the list.
MOUNT_MODE=unbuffered run_once "$PLAIN" recording --record-access "$WORK/access.txt"
bench_cleanup_tail "$mark"
cp "$WORK/access.txt" "$OUT/record.access.txt"
log "recorded $(wc -l < "$WORK/access.txt") files"

"$BIN" -q convert --force --prioritize "$WORK/access.txt" "$PLAIN" "$PRIO" >/dev/null

cold_run() { # KIND IMAGE REP
  local mark misses
  mark=$(cleanup_mark)
  run_once "127.0.0.1:$WAN_PORT/${2#*/}" "$1.$3"
  bench_cleanup_tail "$mark"
  read -r sb sr fb fr < <(stats_fields "$STATS")
  misses=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["store"]["cache_misses"])' "$STATS")
  rm -rf "$CACHE_DIR"
  printf '{"kind":"%s","rep":%s,"run_ms":%s,"workload_ms":%s,"startup_bytes":%s,"startup_requests":%s,"store_bytes":%s,"store_requests":%s,"cache_misses":%s,"loadavg":%s}\n' \
    "$1" "$3" "$RUN_MS" "$WORK_MS" "$sb" "$sr" "$fb" "$fr" "$misses" "$(loadavg)" >> "$RESULTS"
  log "$1 rep $3: ${RUN_MS} ms to the end of the workload (${WORK_MS} ms for it alone), store: $fb bytes in $fr requests, $misses reads waited"
}

for rep in $(seq 1 "$REPS"); do
  cold_run plain "$PLAIN" "$rep"
  cold_run prioritized "$PRIO" "$rep"
done

python3 - "$OUT/record.meta.json" "$REPS" "$DELAY_MS" "$(wc -l < "$WORK/access.txt")" "$WORKLOAD" <<EOF
import json, sys, time
path, reps, delay, recorded, workload = sys.argv[1:]
json.dump({
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "git": "$(git_rev)",
    "machine": $(machine_json),
    "command": "scripts/bench/record.sh %s (DELAY_MS=%s)" % (reps, delay),
    "workload": "chroot MNT /bin/sh -c '%s'" % workload,
    "recorded_files": int(recorded),
    "link": "docker-registry on 127.0.0.1 behind wanproxy.py with a one-way delay of %s ms per direction, no rate limit" % delay,
    "images": "plain: esgz-nbd convert --force oci:DEBIAN IMAGE (no --prioritize, so .no.prefetch.landmark); prioritized: esgz-nbd convert --force --prioritize RECORD plain IMAGE",
    "run": "esgz-nbd serve IMAGE --socket S --cache-dir FRESH --stats-file F; nbdfuse --readonly + losetup -r + mount -t ext4 -o ro,noload; the workload. The record run added --record-access RECORD and mounted with losetup --direct-io=on and blockdev --setra 0, so read-ahead added no neighbouring files",
}, open(path, "w"), indent=1)
EOF
log "wrote $RESULTS"
