#!/usr/bin/env bash
# Make sure /dev/fuse and loop devices exist, which nbdfuse, losetup and
# `mount -o loop` need. Loads the modules or creates the device nodes only
# when they are missing. Exits 1 with a message when that fails.
set -euo pipefail

status=0

if [ ! -c /dev/fuse ]; then
  modprobe fuse 2>/dev/null || true
  [ -c /dev/fuse ] || mknod -m 0666 /dev/fuse c 10 229 2>/dev/null || true
fi
if [ -c /dev/fuse ]; then
  echo "check-devices.sh: /dev/fuse present"
else
  echo "check-devices.sh: /dev/fuse is missing and could not be created (modprobe fuse, mknod /dev/fuse c 10 229); NBD mount tests will fail" >&2
  status=1
fi

if [ ! -c /dev/loop-control ]; then
  modprobe loop 2>/dev/null || true
  [ -c /dev/loop-control ] || mknod -m 0660 /dev/loop-control c 10 237 2>/dev/null || true
fi
# losetup --find creates loop nodes through /dev/loop-control, but in a
# container /dev may be static, so provide the first eight nodes.
for i in 0 1 2 3 4 5 6 7; do
  [ -b "/dev/loop$i" ] || mknod -m 0660 "/dev/loop$i" b 7 "$i" 2>/dev/null || true
done
if [ -c /dev/loop-control ] && losetup --find >/dev/null 2>&1; then
  echo "check-devices.sh: loop devices present, next free: $(losetup --find)"
else
  echo "check-devices.sh: no free loop device (modprobe loop, mknod /dev/loop-control c 10 237); loop and NBD mount tests will fail" >&2
  status=1
fi

exit "$status"
