#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (default 30 s each), seeded
# from the eStargz fixtures. Only the stable toolchain is assumed:
# RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its nightly-only flags
# (-Zsanitizer=address). A crash leaves its input in
# fuzz/artifacts/TARGET/ and makes the script exit 1; turn such an input into a
# regression case in tests/fault_fuzz_props.rs.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
set -euo pipefail

seconds="${1:-30}"
shift || true
root="$(cd "$(dirname "$0")/.." && pwd)"
shared="${ESGZ_SHARED:-$root/../shared}"
[ -d "$shared/fixtures" ] || shared=/work/shared
fixtures="$shared/fixtures"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz.sh: cargo-fuzz not found; install it with: cargo install cargo-fuzz --locked" >&2
  exit 1
fi

targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  targets=(footer toc_index tar_index manifest nbd_stream ext4_layout)
fi

# Seeds: footers (8-byte little-endian blob size + the last 51 bytes), TOC JSON
# (8-byte TOC offset + JSON), small input tars and OCI JSON documents.
seed() {
  local corpus="$root/fuzz/corpus"
  mkdir -p "$corpus"/{footer,toc_index,tar_index,manifest,nbd_stream,ext4_layout}
  local fixture name blob size
  for fixture in "$fixtures"/*/; do
    name="$(basename "$fixture")"
    for toc in "$fixture"/*.toc.json; do
      [ -f "$toc" ] || continue
      cp "$toc" "$corpus/ext4_layout/$name-$(basename "$toc")"
      { printf '\x00\x00\x00\x00\x00\x01\x00\x00'; cat "$toc"; } \
        >"$corpus/toc_index/$name-$(basename "$toc")"
    done
    for tar in "$fixture"/*.tar; do
      [ -f "$tar" ] || continue
      [ "$(stat -c %s "$tar")" -lt 1048576 ] && cp "$tar" "$corpus/tar_index/$name-$(basename "$tar")"
    done
    [ -f "$fixture/oci/index.json" ] && cp "$fixture/oci/index.json" "$corpus/manifest/$name-index.json"
    for blob in "$fixture"/oci/blobs/sha256/*; do
      if [ "$(head -c 1 "$blob")" = "{" ]; then
        cp "$blob" "$corpus/manifest/$name-$(basename "$blob")"
      else
        size="$(stat -c %s "$blob")"
        [ "$size" -ge 51 ] || continue
        { python3 -c "import struct,sys; sys.stdout.buffer.write(struct.pack('<Q', $size))"
          tail -c 51 "$blob"; } >"$corpus/footer/$name-$(basename "$blob")"
      fi
    done
  done
  # An NBD client session: flags, NBD_OPT_GO for the empty name, one read, DISC.
  python3 - "$corpus/nbd_stream/session" <<'PY'
import struct, sys
b = struct.pack(">I", 3)
b += struct.pack(">QII", 0x49484156454F5054, 7, 6) + b"\0" * 6
b += struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 0, 4096)
b += struct.pack(">IHHQQI", 0x25609513, 0, 2, 2, 0, 0)
open(sys.argv[1], "wb").write(b)
PY
}

seed
status=0
cd "$root/fuzz"
for target in "${targets[@]}"; do
  echo "fuzz.sh: $target for $seconds s"
  if ! RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "corpus/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=20 -print_final_stats=1; then
    echo "fuzz.sh: $target found a crash; see fuzz/artifacts/$target/" >&2
    status=1
  fi
done
exit "$status"
