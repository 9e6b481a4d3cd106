#!/usr/bin/env bash
# Cost of the per-block crc32 check on warm cache reads: the Debian export served
# by two builds of esgz-nbd, one from before the check (ESGZ_NBD_BASE) and the
# current one (ESGZ_NBD, default target/release/esgz-nbd), each from its own warm
# cache over io_uring, read in alternating order in one run.
#
#   ESGZ_NBD_BASE=/path/to/older/esgz-nbd cachecheck.sh [REPS]
#
# Each measurement is nbdcopy --no-extents of the whole export to null: (every
# byte read, holes included), one pass with 4 KiB requests and four with 1 MiB.
# Each measurement also records the server's CPU time (utime + stime from
# /proc/PID/stat), which a loaded machine disturbs less than the wall time.
# Writes $OUT/cachecheck.jsonl and $OUT/cachecheck.meta.json and prints the
# medians of each build and the ratios current / older.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

REPS=${1:-5}
SIZES=${SIZES:-"4096 1048576"}
BASE=${ESGZ_NBD_BASE:?set ESGZ_NBD_BASE to an esgz-nbd binary built without the block checks}
[ -x "$BASE" ] || die "$BASE is not an executable"
RESULTS=$OUT/cachecheck.jsonl

bench_init
: > "$RESULTS"
image=oci:$DEBIAN_OCI:latest
CURRENT=$BIN

declare -A BINS=([older]=$BASE [current]=$CURRENT)
declare -A SOCKS PIDS
for build in older current; do
  BIN=${BINS[$build]}
  serve_start "$image" "$build" --io io-uring
  "$PY_NBD" "$BENCH_DIR/nbdprobe.py" "$SOCK" --timeout 60 >/dev/null || die "$build build did not start; see $WORK/serve.log"
  log "warming the $build build's cache with one full read"
  nbdcopy "nbd+unix:///?socket=$SOCK" null:
  SOCKS[$build]=$SOCK
  PIDS[$build]=$SERVE_PID
done
BIN=$CURRENT
export_bytes=$(nbdinfo --size "nbd+unix:///?socket=${SOCKS[current]}")

# CPU seconds (user + system) a process has used so far.
cpu_seconds() { # PID
  python3 -c "import os, sys; f = open(f'/proc/{sys.argv[1]}/stat').read().rsplit(')', 1)[1].split(); print((int(f[11]) + int(f[12])) / os.sysconf('SC_CLK_TCK'))" "$1"
}

record() { # BUILD SIZE REP SECONDS BYTES CPU_SECONDS
  printf '{"build":"%s","request_bytes":%s,"rep":%s,"seconds":%s,"bytes":%s,"mb_per_s":%s,"server_cpu_s":%s,"loadavg":%s}\n' \
    "$1" "$2" "$3" "$4" "$5" "$(python3 -c "print(round($5 / $4 / 1e6, 1))")" "$6" "$(loadavg)" >> "$RESULTS"
  log "$1 $2 B rep $3: $4 s, server CPU $6 s"
}

for rep in $(seq 1 "$REPS"); do
  # Alternate which build goes first, so a trend in the machine's load hits both.
  order="older current"
  [ $((rep % 2)) = 0 ] && order="current older"
  for size in $SIZES; do
    passes=1
    [ "$size" -ge 65536 ] && passes=4
    for build in $order; do
      cpu0=$(cpu_seconds "${PIDS[$build]}")
      t0=$(now_ns)
      for _ in $(seq 1 "$passes"); do
        nbdcopy --no-extents --request-size="$size" "nbd+unix:///?socket=${SOCKS[$build]}" null:
      done
      seconds=$(python3 -c "print(($(now_ns) - $t0) / 1e9)")
      cpu=$(python3 -c "print(round($(cpu_seconds "${PIDS[$build]}") - $cpu0, 2))")
      record "$build" "$size" "$rep" "$seconds" $((export_bytes * passes)) "$cpu"
    done
  done
done

python3 - "$RESULTS" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for size in sorted({r["request_bytes"] for r in rows}):
    def median(build, field):
        return statistics.median(r[field] for r in rows if r["build"] == build and r["request_bytes"] == size)
    rate = {build: median(build, "mb_per_s") for build in ("older", "current")}
    cpu = {build: median(build, "server_cpu_s") for build in ("older", "current")}
    print(f"{size} B requests: older {rate['older']} MB/s, current {rate['current']} MB/s, "
          f"current / older {rate['current'] / rate['older']:.3f}; server CPU older {cpu['older']} s, "
          f"current {cpu['current']} s, current / older {cpu['current'] / cpu['older']:.3f}")
EOF

python3 - "$OUT/cachecheck.meta.json" <<EOF
import json, sys, time
json.dump({
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "git": "$(git_rev)",
    "machine": $(machine_json),
    "command": "ESGZ_NBD_BASE=... scripts/bench/cachecheck.sh $REPS",
    "export_bytes": $export_bytes,
    "servers": "esgz-nbd serve oci:DEBIAN:latest --socket S --cache-dir C --io io-uring, one per build, each after one full nbdcopy read",
    "seq": "nbdcopy --no-extents --request-size=SIZE nbd+unix:///?socket=S null:",
    "passes": "1 pass over the export for 4 KiB requests, 4 passes for 1 MiB",
}, open(sys.argv[1], "w"), indent=1)
EOF
log "wrote $RESULTS"
