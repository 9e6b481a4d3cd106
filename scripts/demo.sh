#!/usr/bin/env bash
# Serve an image with esgz-nbd, mount it and show the files inside, then
# clean up. With no argument it serves the sample image in examples/.
#
#   scripts/demo.sh [IMAGE]
#
# As root the export is mounted with the kernel's ext4 (nbdfuse, then a
# read-only loop device); otherwise debugfs reads it through nbdfuse.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
image=${1:-oci:$repo/examples/sample-oci:latest}
bin=${ESGZ_NBD:-$repo/target/release/esgz-nbd}
if [ ! -x "$bin" ]; then
  echo "demo.sh: $bin not found; build it first with: cargo build --release" >&2
  exit 1
fi
for tool in nbdfuse debugfs; do
  command -v "$tool" >/dev/null || { echo "demo.sh: $tool not found; run scripts/install-deps.sh" >&2; exit 1; }
done

work=$(mktemp -d /tmp/esgz-demo.XXXXXX)
server_pid= nbdfuse_pid= loop_dev=
cleanup() {
  set +e
  mountpoint -q "$work/mnt" 2>/dev/null && umount "$work/mnt"
  [ -n "$loop_dev" ] && losetup -d "$loop_dev"
  if [ -n "$nbdfuse_pid" ]; then
    fusermount3 -u "$work/fuse" 2>/dev/null || umount "$work/fuse" 2>/dev/null
    wait "$nbdfuse_pid" 2>/dev/null
  fi
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

echo "# esgz-nbd serve $image"
started=$(date +%s%N)
"$bin" serve "$image" --socket "$work/nbd.sock" --cache-dir "$work/cache" \
  --stats-file "$work/stats.json" -q >/dev/null &
server_pid=$!
for _ in $(seq 1 600); do
  [ -S "$work/nbd.sock" ] && break
  kill -0 "$server_pid" 2>/dev/null || { echo "demo.sh: esgz-nbd serve exited early" >&2; exit 1; }
  sleep 0.05
done
[ -S "$work/nbd.sock" ] || { echo "demo.sh: the server did not open its socket in 30 s" >&2; exit 1; }
echo "# ready after $(( ($(date +%s%N) - started) / 1000000 )) ms: nbd+unix:///?socket=$work/nbd.sock"

mkdir "$work/fuse" "$work/mnt"
nbdfuse --readonly "$work/fuse/disk" "nbd+unix:///?socket=$work/nbd.sock" &
nbdfuse_pid=$!
for _ in $(seq 1 100); do [ -f "$work/fuse/disk" ] && break; sleep 0.05; done

if [ "$(id -u)" = 0 ]; then
  loop_dev=$(losetup --find --show --read-only "$work/fuse/disk")
  mount -t ext4 -o ro,noload "$loop_dev" "$work/mnt"
  echo "# mounted $loop_dev on $work/mnt"
  (cd "$work/mnt" && ls -lnAR --time-style=long-iso . | head -60)
  if [ -f "$work/mnt/etc/os-release" ]; then
    echo "# cat /etc/os-release"
    cat "$work/mnt/etc/os-release"
  fi
else
  echo "# not root: listing with debugfs instead of a kernel mount"
  debugfs -R 'ls -l /' "$work/fuse/disk" 2>/dev/null
fi

sleep 1.2
echo "# server counters"
cat "$work/stats.json"
echo
