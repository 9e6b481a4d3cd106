#!/usr/bin/env bash
# Attach cost against image size: synthetic eStargz images with 1k to 1M TOC
# entries in 1, 5 and 20 layers, served from a local OCI layout. Measures the
# time from `esgz-nbd serve` to the first completed NBD read and the server's
# peak resident memory (VmHWM) at that point.
#
#   attach.sh [REPS]   (env: ENTRIES="1000 10000 100000 1000000", LAYERS="1 5 20")
#
# Generated images are kept in $OUT/images and reused. The 1k/5-layer image is
# checked with the reference reader (estargz-ref verify -require-all); ESTARGZ_REF
# names it, by default target/estargz-ref, built with the shared build.sh if missing.
# Writes $OUT/attach.jsonl and $OUT/attach.meta.json.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

REPS=${1:-3}
ENTRIES=${ENTRIES:-"1000 10000 100000 1000000"}
LAYERS=${LAYERS:-"1 5 20"}
ESTARGZ_REF=${ESTARGZ_REF:-$REPO/target/estargz-ref}
RESULTS=$OUT/attach.jsonl
IMAGES=$OUT/images

bench_init
: > "$RESULTS"
mkdir -p "$IMAGES"

generate() { # ENTRIES LAYERS -> prints the layout dir
  local dir=$IMAGES/e$1-l$2
  if [ ! -f "$dir/index.json" ]; then
    rm -rf "$dir"
    log "generating $1 entries in $2 layers"
    python3 "$BENCH_DIR/gen_estargz.py" --entries "$1" --layers "$2" --out "$dir.tmp" > "$dir.tmp.summary.json"
    mv "$dir.tmp" "$dir"
    mv "$dir.tmp.summary.json" "$dir.summary.json"
  fi
  echo "$dir"
}

verified=None
if [ ! -x "$ESTARGZ_REF" ]; then
  log "building the reference checker into $ESTARGZ_REF"
  "$SHARED/tools/estargz-ref/build.sh" "$ESTARGZ_REF" >&2 || die "could not build estargz-ref with $SHARED/tools/estargz-ref/build.sh"
fi
if [ -x "$ESTARGZ_REF" ]; then
  dir=$(generate 1000 5)
  if "$ESTARGZ_REF" verify -oci "$dir:latest" -require-all > "$WORK/verify.out" 2>&1; then
    verified="\"$(tail -n 1 "$WORK/verify.out")\""
  else
    cat "$WORK/verify.out" >&2
    die "estargz-ref rejected the generated image $dir"
  fi
  log "estargz-ref verify: $(tail -n 1 "$WORK/verify.out")"
else
  log "skipping the reference check: $ESTARGZ_REF not found (build it with estargz-ref's build.sh)"
fi

for entries in $ENTRIES; do
  for layers in $LAYERS; do
    dir=$(generate "$entries" "$layers")
    blob_bytes=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["blob_bytes"])' "$dir.summary.json")
    for rep in $(seq 1 "$REPS"); do
      mark=$(cleanup_mark)
      probe_out=$WORK/probe.out
      rm -f "$WORK/attach.sock"
      "$PY_NBD" "$BENCH_DIR/nbdprobe.py" "$WORK/attach.sock" --timeout 600 >"$probe_out" &
      probe_pid=$!
      sleep 0.3
      CACHE_DIR=$WORK/attach.cache
      t0=$(now_ns)
      serve_start "oci:$dir:latest" attach
      if ! wait "$probe_pid"; then
        tail -n 5 "$WORK/serve.log" >&2
        die "esgz-nbd did not complete a read for $dir"
      fi
      ready_ms=$(( ($(cat "$probe_out") - t0) / 1000000 ))
      hwm=$(vm_hwm_kib "$SERVE_PID")
      rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$SERVE_PID/status")
      bench_cleanup_tail "$mark"
      rm -rf "$CACHE_DIR"
      printf '{"entries":%s,"layers":%s,"rep":%s,"ready_ms":%s,"vm_hwm_kib":%s,"vm_rss_kib":%s,"blob_bytes":%s,"loadavg":%s}\n' \
        "$entries" "$layers" "$rep" "$ready_ms" "$hwm" "$rss" "$blob_bytes" "$(loadavg)" >> "$RESULTS"
      log "$entries entries, $layers layers, rep $rep: ready in $ready_ms ms, VmHWM $((hwm / 1024)) MiB"
    done
  done
done

python3 - "$OUT/attach.meta.json" <<EOF
import json, sys, time
json.dump({
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "git": "$(git_rev)",
    "machine": $(machine_json),
    "command": "scripts/bench/attach.sh $REPS (ENTRIES='$ENTRIES' LAYERS='$LAYERS')",
    "generator": "scripts/bench/gen_estargz.py --entries N --layers L --out DIR (gzip level 1; 1% dirs, 10% symlinks, files of 0-511 bytes)",
    "serve": "esgz-nbd serve oci:DIR:latest --socket S --cache-dir FRESH --stats-file F; ready = nbdprobe.py completed pread(4096, 0); VmHWM and VmRSS from /proc/PID/status right after",
    "reference_check": $verified,
}, open(sys.argv[1], "w"), indent=1)
EOF
log "wrote $RESULTS"
