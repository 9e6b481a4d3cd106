#!/usr/bin/env bash
# Warm-cache reads of the whole Debian export: esgz-nbd against nbdkit's file
# plugin and qemu-nbd serving the raw image from `esgz-nbd export`, all in
# one run and all read from the page cache.
#
#   warm.sh [REPS]
#
# Sequential: nbdcopy --no-extents (every byte is read, holes included).
# Random: fio's nbd engine, randread over the whole export (each block once).
# Writes $OUT/warm.jsonl and $OUT/warm.meta.json.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

REPS=${1:-3}
SIZES=${SIZES:-"4096 1048576"}
FIO_DEPTHS=${FIO_DEPTHS:-"1 16"}
RESULTS=$OUT/warm.jsonl

bench_init
: > "$RESULTS"
image=oci:$DEBIAN_OCI:latest
raw=$WORK/debian.raw

log "exporting $image to $raw"
"$BIN" -q export "$image" -o "$raw" --cache-dir "$WORK/export.cache" >/dev/null
export_bytes=$(stat -c %s "$raw")

CACHE_DIR=$WORK/warm.cache
serve_start "$image" ours
"$PY_NBD" "$BENCH_DIR/nbdprobe.py" "$SOCK" --timeout 60 >/dev/null || die "esgz-nbd did not start; see $WORK/serve.log"
log "warming the esgz-nbd cache with one full read"
nbdcopy "nbd+unix:///?socket=$SOCK" null:
declare -A SOCKS=([esgz-nbd]=$SOCK)
declare -A PIDS=([esgz-nbd]=$SERVE_PID)

SOCKS[nbdkit]=$WORK/nbdkit.sock
nbdkit -f -U "${SOCKS[nbdkit]}" file "$raw" &
PIDS[nbdkit]=$!
on_exit "stop_pid $!"
SOCKS[qemu-nbd]=$WORK/qemu-nbd.sock
qemu-nbd -r -t --shared=16 -k "${SOCKS[qemu-nbd]}" -f raw "$raw" &
PIDS[qemu-nbd]=$!
on_exit "stop_pid $!"
for name in nbdkit qemu-nbd; do
  "$PY_NBD" "$BENCH_DIR/nbdprobe.py" "${SOCKS[$name]}" --timeout 30 >/dev/null || die "$name did not start"
done
# Read the raw file once so that both peers serve from the page cache too.
cat "$raw" > /dev/null

# CPU time (user + system) of a process so far, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICKS_PER_S=$(getconf CLK_TCK)

record() { # SERVER PATTERN SIZE DEPTH REP SECONDS BYTES SERVER_CPU_TICKS
  printf '{"server":"%s","pattern":"%s","request_bytes":%s,"depth":%s,"rep":%s,"seconds":%s,"bytes":%s,"mb_per_s":%s,"server_cpu_s":%s,"loadavg":%s}\n' \
    "$1" "$2" "$3" "$4" "$5" "$6" "$7" "$(python3 -c "print(round($7 / $6 / 1e6, 1))")" \
    "$(python3 -c "print(round($8 / $TICKS_PER_S, 2))")" "$(loadavg)" >> "$RESULTS"
  log "$1 $2 $3 B depth $4 rep $5: $6 s"
}

for rep in $(seq 1 "$REPS"); do
  for size in $SIZES; do
    for name in esgz-nbd nbdkit qemu-nbd; do
      uri="nbd+unix:///?socket=${SOCKS[$name]}"
      # Large requests finish a pass in a fraction of a second, so they get
      # several passes per measurement.
      passes=1
      [ "$size" -ge 65536 ] && passes=4
      pid=${PIDS[$name]}
      cpu0=$(cpu_ticks "$pid")
      t0=$(now_ns)
      for _ in $(seq 1 "$passes"); do
        nbdcopy --no-extents --request-size="$size" "$uri" null:
      done
      seconds=$(python3 -c "print(($(now_ns) - $t0) / 1e9)")
      record "$name" seq "$size" 64 "$rep" "$seconds" $((export_bytes * passes)) $(($(cpu_ticks "$pid") - cpu0))

      for depth in $FIO_DEPTHS; do
        cpu0=$(cpu_ticks "$pid")
        fio --name=rand --ioengine=nbd --uri="$uri" --rw=randread --bs="$size" \
          --iodepth="$depth" --loops="$passes" --runtime=30 --output-format=json --output="$WORK/fio.json" >/dev/null
        read -r seconds bytes < <(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))["jobs"][0]["read"]
print(r["runtime"] / 1000, r["io_bytes"])' "$WORK/fio.json")
        record "$name" rand "$size" "$depth" "$rep" "$seconds" "$bytes" $(($(cpu_ticks "$pid") - cpu0))
      done
    done
  done
done

python3 - "$OUT/warm.meta.json" <<EOF
import json, sys, time
json.dump({
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "git": "$(git_rev)",
    "machine": $(machine_json),
    "command": "scripts/bench/warm.sh $REPS",
    "export_bytes": $export_bytes,
    "servers": {
        "esgz-nbd": "esgz-nbd serve oci:DEBIAN:latest --socket S --cache-dir WARM (after one full nbdcopy read)",
        "nbdkit": "nbdkit -f -U S file RAW",
        "qemu-nbd": "qemu-nbd -r -t --shared=16 -k S -f raw RAW",
    },
    "seq": "nbdcopy --no-extents --request-size=SIZE nbd+unix:///?socket=S null:  (default 64 requests in flight, up to 4 connections when the server allows multi-conn)",
    "rand": "fio --name=rand --ioengine=nbd --uri=nbd+unix:///?socket=S --rw=randread --bs=SIZE --iodepth=DEPTH --loops=PASSES --runtime=30",
    "passes": "1 pass over the export for 4 KiB requests, 4 passes for 1 MiB",
    "server_cpu": "user + system CPU time of the server process during each measurement, from /proc/PID/stat",
}, open(sys.argv[1], "w"), indent=1)
EOF
log "wrote $RESULTS"
