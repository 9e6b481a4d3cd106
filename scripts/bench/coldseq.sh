#!/usr/bin/env bash
# Cold sequential read of the whole Debian export (fresh cache, over the
# emulated WAN) against the two limits: the link (curl of the blob through the
# same proxy and veth) and gunzip of the blob on both cores. Each esgz-nbd run
# also records the server's CPU time (user + system) during the copy. A run
# from the OCI layout on local disk, with no network, shows how many cores the
# decompression keeps busy when nothing else bounds it.
#
#   coldseq.sh [REPS]          (env: RATES="200mbit 1gbit", DELAY_MS=10)
#
# Writes $OUT/coldseq.jsonl and $OUT/coldseq.meta.json.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

REPS=${1:-3}
RATES=${RATES:-"200mbit 1gbit"}
DELAY_MS=${DELAY_MS:-10}
RESULTS=$OUT/coldseq.jsonl
BLOB_DIGEST=sha256:4f480932bba265dae71dba354dfee332bc4302996c1a0686e1b7b25091981d3e
BLOB=$DEBIAN_OCI/blobs/sha256/${BLOB_DIGEST#sha256:}

bench_init
: > "$RESULTS"
wan_up "$DELAY_MS"
IMAGE=127.0.0.1:$WAN_PORT/debian:latest
blob_bytes=$(stat -c %s "$BLOB")

TICKS=$(getconf CLK_TCK)
cpu_seconds() { # PID: user + system CPU seconds of the process so far
  awk -v ticks="$TICKS" '{ printf "%.3f\n", ($14 + $15) / ticks }' "/proc/$1/stat"
}
cpu_since() { python3 -c "print(round($(cpu_seconds "$1") - $2, 3))"; }

seconds_since() { python3 -c "print(round(($(now_ns) - $1) / 1e9, 3))"; }

emit() { # KIND RATE REP SECONDS [EXTRA_JSON]
  printf '{"kind":"%s","rate":"%s","rep":%s,"seconds":%s,"blob_bytes":%s,"loadavg":%s%s}\n' \
    "$1" "$2" "$3" "$4" "$blob_bytes" "$(loadavg)" "${5:-}" >> "$RESULTS"
  log "$1 $2 rep $3: $4 s"
}

# Gunzip limit: no network, so it is measured once, not per rate.
python3 "$BENCH_DIR/split_blob.py" "$BLOB" "$WORK/half1.gz" "$WORK/half2.gz" >/dev/null
cat "$BLOB" "$WORK/half1.gz" "$WORK/half2.gz" >/dev/null
for rep in $(seq 1 "$REPS"); do
  t0=$(now_ns)
  pigz -dc -p 2 "$BLOB" >/dev/null
  emit gunzip-pigz local "$rep" "$(seconds_since "$t0")"
  t0=$(now_ns)
  pigz -dc "$WORK/half1.gz" >/dev/null &
  p1=$!
  pigz -dc "$WORK/half2.gz" >/dev/null &
  p2=$!
  wait "$p1" "$p2"
  emit gunzip-halves local "$rep" "$(seconds_since "$t0")"
done

# Local: the layout on disk, no network, fresh cache.
for rep in $(seq 1 "$REPS"); do
  mark=$(cleanup_mark)
  CACHE_DIR=$WORK/coldseq.cache
  serve_start "oci:$DEBIAN_OCI:latest" coldseq
  "$PY_NBD" "$BENCH_DIR/nbdprobe.py" "$SOCK" --timeout 120 >/dev/null || die "esgz-nbd did not start; see $WORK/serve.log"
  c0=$(cpu_seconds "$SERVE_PID")
  t1=$(now_ns)
  nbdcopy "nbd+unix:///?socket=$SOCK" null:
  copy=$(seconds_since "$t1")
  cpu=$(cpu_since "$SERVE_PID" "$c0")
  bench_cleanup_tail "$mark"
  rm -rf "$CACHE_DIR"
  emit esgz-nbd-local local "$rep" "$copy" ",\"cpu_seconds\":$cpu"
done

for rate in $RATES; do
  link_rate "$rate"
  for rep in $(seq 1 "$REPS"); do
    t0=$(now_ns)
    curl -sSf -o /dev/null "http://127.0.0.1:$WAN_PORT/v2/debian/blobs/$BLOB_DIGEST"
    emit link "$rate" "$rep" "$(seconds_since "$t0")"

    mark=$(cleanup_mark)
    CACHE_DIR=$WORK/coldseq.cache
    t0=$(now_ns)
    serve_start "$IMAGE" coldseq
    "$PY_NBD" "$BENCH_DIR/nbdprobe.py" "$SOCK" --timeout 120 >/dev/null || die "esgz-nbd did not start; see $WORK/serve.log"
    ready=$(seconds_since "$t0")
    c0=$(cpu_seconds "$SERVE_PID")
    t1=$(now_ns)
    nbdcopy "nbd+unix:///?socket=$SOCK" null:
    copy=$(seconds_since "$t1")
    cpu=$(cpu_since "$SERVE_PID" "$c0")
    total=$(seconds_since "$t0")
    bench_cleanup_tail "$mark"
    read -r sb sr fb fr < <(stats_fields "$STATS")
    rm -rf "$CACHE_DIR"
    emit esgz-nbd "$rate" "$rep" "$copy" \
      ",\"ready_seconds\":$ready,\"total_seconds\":$total,\"cpu_seconds\":$cpu,\"bytes\":$((sb + fb)),\"requests\":$((sr + fr))"
  done
done

python3 - "$OUT/coldseq.meta.json" <<EOF
import json, sys, time
json.dump({
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "git": "$(git_rev)",
    "machine": $(machine_json),
    "command": "scripts/bench/coldseq.sh $REPS (RATES='$RATES' DELAY_MS=$DELAY_MS)",
    "link": "$(link_rate_command RATE); wanproxy.py one-way delay $DELAY_MS ms per direction",
    "esgz-nbd": "esgz-nbd serve 127.0.0.1:PORT/debian:latest --cache-dir FRESH; nbdprobe.py; then timed: nbdcopy nbd+unix:///?socket=S null:",
    "link_limit": "curl -sSf -o /dev/null http://127.0.0.1:PORT/v2/debian/blobs/DIGEST",
    "local": "esgz-nbd serve oci:DEBIAN:latest --cache-dir FRESH; then timed: nbdcopy nbd+unix:///?socket=S null: (no network)",
    "cpu": "utime + stime of the server from /proc/PID/stat, read before and after the nbdcopy",
    "gunzip_limit": "min of: pigz -dc -p 2 BLOB; two halves split at a gzip member boundary, pigz -dc each, in parallel",
}, open(sys.argv[1], "w"), indent=1)
EOF
log "wrote $RESULTS"
