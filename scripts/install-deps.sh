#!/usr/bin/env bash
# Install the Debian 12 (bookworm) packages that building and testing
# esgz-nbd need. Run as root: sudo scripts/install-deps.sh
#
# The Rust toolchain itself is not a Debian package here; install it with
# rustup (https://rustup.rs).
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "install-deps.sh: run as root, for example: sudo $0" >&2
  exit 1
fi

packages=(
  # Building: a C compiler and linker for Rust crates with C parts.
  build-essential pkg-config
  # A real OCI registry, and image copies into it.
  docker-registry skopeo apache2-utils curl jq
  # NBD peers and clients: servers to compare with, nbdfuse to mount exports.
  nbdkit libnbd-bin qemu-utils fuse3
  # Filesystem oracles: e2fsck, debugfs, mke2fs, fuse2fs, EROFS tools, xattrs.
  e2fsprogs fuse2fs erofs-utils attr
  # Real root filesystems, initramfs parts for VM tests, benchmarks.
  debootstrap busybox-static cpio hyperfine python3
  # The reference eStargz checker (estargz-ref) builds from these.
  golang-go golang-github-containerd-stargz-snapshotter-dev
)

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y "${packages[@]}"

# qemu-system-x86 boots a Debian kernel with its nbd driver for VM tests.
# Bookworm ships it as 7.2, which needs qemu-system-common 7.2. On a host
# that has a newer qemu-utils from bookworm-backports (10.0.2 on the machine
# this was written on), apt resolves that by removing qemu-utils, whose
# qemu-nbd and qemu-img the tests need. So install it only when apt removes
# nothing, and print the packages it would remove otherwise. VM tests then
# skip or fail with their own message.
qemu_system=(--no-install-recommends qemu-system-x86)
removals=$(apt-get install -s "${qemu_system[@]}" 2>/dev/null | sed -n 's/^Remv \([^ ]*\).*/\1/p' | tr '\n' ' ')
if [ -z "$removals" ]; then
  apt-get install -y "${qemu_system[@]}"
else
  echo "install-deps.sh: left out qemu-system-x86, because installing it would remove: $removals" >&2
fi

# Every tool the tests call, so a package that apt dropped or never installed
# shows up here and not as a confusing test failure.
commands=(
  docker-registry skopeo htpasswd curl jq nbdkit nbdfuse nbdinfo qemu-nbd qemu-img
  fusermount3 e2fsck mke2fs debugfs fuse2fs mkfs.erofs getfattr setfattr
  debootstrap busybox cpio hyperfine python3 go
)
missing=()
for command in "${commands[@]}"; do
  command -v "$command" >/dev/null || missing+=("$command")
done
if [ "${#missing[@]}" != 0 ]; then
  echo "install-deps.sh: these commands are still missing after the install: ${missing[*]}" >&2
  exit 1
fi
