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
  nbdkit libnbd-bin python3-libnbd qemu-utils fuse3
  # Filesystem oracles: e2fsck, debugfs, mke2fs, fuse2fs, EROFS tools, xattrs.
  e2fsprogs fuse2fs erofs-utils attr
  # Real root filesystems, initramfs parts for VM tests, benchmarks.
  debootstrap busybox-static cpio hyperfine python3 pigz fio
  # Fault and security tests: GNU time, a TLS server, network namespaces.
  time openssl iproute2
  # The reference eStargz checker (estargz-ref) builds from these.
  golang-go golang-github-containerd-stargz-snapshotter-dev
)

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y "${packages[@]}"

# qemu-system-x86 boots a Debian kernel with its nbd driver for the VM tests.
# Bookworm ships it as 7.2, which needs qemu-system-common 7.2. A newer
# qemu-utils from bookworm-backports conflicts with that, and apt resolves the
# conflict by removing qemu-utils. Installing qemu-utils again afterwards
# brings bookworm's 7.2, which matches, so qemu-img and qemu-nbd stay.
apt-get install -y --no-install-recommends qemu-system-x86
apt-get install -y --no-install-recommends qemu-utils

# Every tool the tests call, so a package that apt dropped or never installed
# shows up here and not as a confusing test failure.
commands=(
  docker-registry skopeo htpasswd curl jq nbdkit nbdfuse nbdinfo qemu-nbd qemu-img
  fusermount3 e2fsck mke2fs debugfs fuse2fs mkfs.erofs getfattr setfattr
  debootstrap busybox cpio hyperfine python3 go nbdsh qemu-system-x86_64 pigz
)
missing=()
for command in "${commands[@]}"; do
  command -v "$command" >/dev/null || missing+=("$command")
done
if [ "${#missing[@]}" != 0 ]; then
  echo "install-deps.sh: these commands are still missing after the install: ${missing[*]}" >&2
  exit 1
fi
