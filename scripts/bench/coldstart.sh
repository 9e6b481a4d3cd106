#!/usr/bin/env bash
# Cold start of the Debian image over an emulated WAN: esgz-nbd (lazy) against
# pull + unpack + mke2fs + loop mount (full), alternating in each repetition.
#
#   coldstart.sh [REPS]        (env: RATES="200mbit 1gbit", DELAY_MS=10)
#
# Writes one JSON line per run to $OUT/coldstart.jsonl and the commands used
# to $OUT/coldstart.meta.json.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

REPS=${1:-5}
RATES=${RATES:-"200mbit 1gbit"}
DELAY_MS=${DELAY_MS:-10}
RESULTS=$OUT/coldstart.jsonl

bench_init
: > "$RESULTS"
wan_up "$DELAY_MS"
IMAGE=127.0.0.1:$WAN_PORT/debian:latest
REGISTRY_URL=http://127.0.0.1:$WAN_PORT/v2/debian
MANIFEST_ACCEPT='application/vnd.oci.image.manifest.v1+json'

lazy_run() { # RATE REP
  local mark t0 t_dev t_first t_work probe_out hwm
  mark=$(cleanup_mark)
  probe_out=$WORK/probe.out
  "$PY_NBD" "$BENCH_DIR/nbdprobe.py" "$WORK/lazy.sock" --timeout 120 >"$probe_out" &
  local probe_pid=$!
  sleep 0.3
  CACHE_DIR=$WORK/lazy.cache.$2
  t0=$(now_ns)
  serve_start "$IMAGE" lazy
  wait "$probe_pid" || die "the lazy server did not complete a read; see $WORK/serve.log"
  t_dev=$(( ($(cat "$probe_out") - t0) / 1000000 ))

  mount_nbd "$SOCK" lazy
  cat "$MNT/etc/os-release" >/dev/null
  t_first=$(ms_since "$t0")
  run_workload "$MNT"
  t_work=$(ms_since "$t0")
  hwm=$(vm_hwm_kib "$SERVE_PID")

  bench_cleanup_tail "$mark"
  read -r sb sr fb fr < <(stats_fields "$STATS")
  rm -rf "$CACHE_DIR"
  printf '{"rate":"%s","rtt_ms":%s,"rep":%s,"mode":"lazy","device_ms":%s,"first_file_ms":%s,"workload_ms":%s,"startup_bytes":%s,"startup_requests":%s,"store_bytes":%s,"store_requests":%s,"bytes":%s,"requests":%s,"vm_hwm_kib":%s,"loadavg":%s}\n' \
    "$1" $((2 * DELAY_MS)) "$2" "$t_dev" "$t_first" "$t_work" "$sb" "$sr" "$fb" "$fr" \
    $((sb + fb)) $((sr + fr)) "$hwm" "$(loadavg)" >> "$RESULTS"
  log "lazy $1 rep $2: device ${t_dev} ms, first file ${t_first} ms, workload ${t_work} ms, $((sb + fb)) bytes in $((sr + fr)) requests"
}

full_run() { # RATE REP
  local mark t0 t_pull t_unpack t_mkfs t_mount t_first t_work dir bytes requests digest size_kib
  mark=$(cleanup_mark)
  dir=$WORK/full
  rm -rf "$dir"
  mkdir -p "$dir/blobs" "$dir/rootfs" "$dir/mnt"
  on_exit "rm -rf '$dir'"

  t0=$(now_ns)
  bytes=$(curl -sf -H "Accept: $MANIFEST_ACCEPT" -o "$dir/manifest.json" -w '%{size_download}' \
    "$REGISTRY_URL/manifests/latest")
  requests=1
  local args=() digests
  digests=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(m["config"]["digest"]); [print(l["digest"]) for l in m["layers"]]' "$dir/manifest.json")
  for digest in $digests; do
    args+=(-o "$dir/blobs/${digest#sha256:}" "$REGISTRY_URL/blobs/$digest")
    requests=$((requests + 1))
  done
  # All blobs in parallel, as container runtimes pull layers.
  local sizes
  sizes=$(curl -sSf --no-progress-meter --parallel --parallel-max 8 -w '%{size_download}\n' "${args[@]}")
  for s in $sizes; do bytes=$((bytes + s)); done
  t_pull=$(ms_since "$t0")

  for digest in $(echo "$digests" | tail -n +2); do
    tar -xzf "$dir/blobs/${digest#sha256:}" --xattrs --numeric-owner -C "$dir/rootfs"
  done
  t_unpack=$(ms_since "$t0")

  size_kib=$(( $(du -sk "$dir/rootfs" | cut -f1) * 13 / 10 + 65536 ))
  mke2fs -q -t ext4 -d "$dir/rootfs" "$dir/disk.img" "${size_kib}k" >/dev/null
  t_mkfs=$(ms_since "$t0")

  mount -o loop,ro "$dir/disk.img" "$dir/mnt"
  on_exit "umount '$dir/mnt'"
  t_mount=$(ms_since "$t0")
  cat "$dir/mnt/etc/os-release" >/dev/null
  t_first=$(ms_since "$t0")
  run_workload "$dir/mnt"
  t_work=$(ms_since "$t0")

  bench_cleanup_tail "$mark"
  printf '{"rate":"%s","rtt_ms":%s,"rep":%s,"mode":"full","pull_ms":%s,"unpack_ms":%s,"mkfs_ms":%s,"mount_ms":%s,"first_file_ms":%s,"workload_ms":%s,"bytes":%s,"requests":%s,"loadavg":%s}\n' \
    "$1" $((2 * DELAY_MS)) "$2" "$t_pull" "$t_unpack" "$t_mkfs" "$t_mount" "$t_first" "$t_work" \
    "$bytes" "$requests" "$(loadavg)" >> "$RESULTS"
  log "full $1 rep $2: pull ${t_pull} ms, unpack done ${t_unpack} ms, mkfs done ${t_mkfs} ms, first file ${t_first} ms, workload ${t_work} ms"
}

for rate in $RATES; do
  link_rate "$rate"
  for rep in $(seq 1 "$REPS"); do
    lazy_run "$rate" "$rep"
    full_run "$rate" "$rep"
  done
done

python3 - "$OUT/coldstart.meta.json" "$REPS" "$RATES" "$DELAY_MS" "$(link_rate_command RATE)" <<EOF
import json, sys, time
path, reps, rates, delay, tc = sys.argv[1:]
json.dump({
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "git": "$(git_rev)",
    "machine": $(machine_json),
    "command": "scripts/bench/coldstart.sh %s (RATES='%s' DELAY_MS=%s)" % (reps, rates, delay),
    "link": "%s; wanproxy.py one-way delay %s ms per direction in front of docker-registry in a network namespace" % (tc, delay),
    "lazy": "esgz-nbd serve 127.0.0.1:PORT/debian:latest --socket S --cache-dir FRESH --stats-file F; nbdprobe.py (connect + pread 4096 @ 0); nbdfuse --readonly + losetup -r + mount -t ext4 -o ro,noload; cat etc/os-release; cat the 12 workload files",
    "full": "curl manifest, then config + blobs in parallel; tar -xzf BLOB --xattrs --numeric-owner; mke2fs -q -t ext4 -d ROOTFS IMG; mount -o loop,ro; cat etc/os-release; cat the 12 workload files",
}, open(path, "w"), indent=1)
EOF
log "wrote $RESULTS"
