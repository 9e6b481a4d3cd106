#!/usr/bin/env bash
# Tests `esgz-nbd attach/detach/list` against the kernel NBD client inside a
# QEMU VM, because a host kernel may lack the nbd driver.
#
# The VM boots Debian's linux-image-amd64 kernel (downloaded with apt-get and
# cached under target/kernel-tests/) with a busybox initramfs that holds the
# release binary, its shared libraries and the nbd, ext4 and virtio modules.
# The images to serve (OCI layouts of the fixtures and of the Debian image)
# and their expected tree manifests sit on a virtio disk, so the guest needs
# no network (QEMU runs with `-nic none`). The guest runs vm-tests.sh, prints
# "N passed, M failed" on the serial console and powers off.
#
# Environment:
#   ESGZ_SHARED       directory with fixtures/ and images/ [../shared next to
#                     the crate, else /work/shared]
#   ESGZ_NBD_BIN      binary to test [target/release/esgz-nbd, built if missing
#                     or older than the sources]
#   VM_TIMEOUT        seconds before the VM is killed [900]
#   VM_CPUS, VM_MEM   guest CPUs [2] and memory in MiB [1536]
#   VM_KEEP_LOG       path to copy the serial log to
#   VM_TESTS_SCRIPT   guest script to run instead of vm-tests.sh, for example a
#                     copy cut down to the part being debugged
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
work="$root/target/kernel-tests"
timeout_secs=${VM_TIMEOUT:-900}
cpus=${VM_CPUS:-2}
mem=${VM_MEM:-1536}
started=$(date +%s)

log() { printf '[run-vm-tests] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }

source "$root/kernel-tests/lib.sh"

vm_require_tools qemu-system-x86_64 busybox cpio mke2fs apt-get dpkg-deb ldd jq
shared=$(vm_find_shared "$root")
mkdir -p "$work"

# --- kernel ---------------------------------------------------------------
vm_fetch_kernel "$work"
# ext4 finds crc32c through the crypto API at mount time, not through depends=.
# loop mounts the image that the full-pull comparison builds with mke2fs.
vm_resolve_modules virtio_pci virtio_blk crc32c_generic ext4 nbd loop

# --- binary ---------------------------------------------------------------
bin=${ESGZ_NBD_BIN:-$root/target/release/esgz-nbd}
if [[ -z "${ESGZ_NBD_BIN:-}" ]]; then
    newest_source=$(find "$root/src" "$root/Cargo.toml" -newer "$bin" -print -quit 2>/dev/null || true)
    if [[ ! -x "$bin" || -n "$newest_source" ]]; then
        log "building the release binary"
        (cd "$root" && cargo build --release --bin esgz-nbd >&2)
    fi
fi
[[ -x "$bin" ]] || die "binary $bin not found"

# --- initramfs ------------------------------------------------------------
initramfs_dir="$work/initramfs"
vm_initramfs_base "$initramfs_dir"
cp "$bin" "$initramfs_dir/bin/esgz-nbd"
# mke2fs builds the image of the full-pull path that the guest times next to
# attach; busybox has no mke2fs that takes -d.
mke2fs_bin=$(command -v mke2fs)
cp "$mke2fs_bin" "$initramfs_dir/sbin/mke2fs"
while read -r lib; do
    mkdir -p "$initramfs_dir$(dirname "$lib")"
    cp -L "$lib" "$initramfs_dir$lib"
done < <(ldd "$bin" "$mke2fs_bin" | grep -o '/[^ ]*' | grep -v ':$' | sort -u)
cp "${VM_TESTS_SCRIPT:-$root/kernel-tests/vm-tests.sh}" "$initramfs_dir/vm-tests.sh"
cat > "$initramfs_dir/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
while read -r module; do
    insmod "/modules/$module.ko" || echo "insmod $module failed"
done < /modules/order
sh /vm-tests.sh
echo "vm-tests exit status $?"
sync
poweroff -f
EOF
chmod +x "$initramfs_dir/init" "$initramfs_dir/vm-tests.sh"
vm_pack_initramfs "$initramfs_dir" "$work/initramfs.gz"

# --- data disk --------------------------------------------------------------
# OCI layouts and expected manifests; the guest mounts it read-write for the
# chunk cache. Hard links avoid copying the blobs when the trees share a filesystem.
stage="$work/data"
rm -rf "$stage"
mkdir -p "$stage/fixtures" "$stage/cache"
copy_tree() { cp -al "$1" "$2" 2>/dev/null || cp -a "$1" "$2"; }
for fixture_dir in "$shared"/fixtures/*/; do
    name=$(basename "$fixture_dir")
    [[ -d "$fixture_dir/oci" ]] || continue
    mkdir -p "$stage/fixtures/$name"
    copy_tree "$fixture_dir/oci" "$stage/fixtures/$name/oci"
    "$bin" -q tree-manifest --from-expected "$fixture_dir/expected.json" > "$stage/fixtures/$name/expected.manifest"
done
debian="$shared/images/debian-bookworm-minbase"
if [[ -d "$debian/oci" ]]; then
    mkdir -p "$stage/debian"
    copy_tree "$debian/oci" "$stage/debian/oci"
    "$bin" -q tree-manifest --from-expected "$debian/expected.json" > "$stage/debian/expected.manifest"
    # The layer blobs in manifest order, for the full-pull path in the guest.
    manifest=$(jq -r '.manifests[0].digest' "$debian/oci/index.json")
    jq -r '.layers[].digest' "$debian/oci/blobs/${manifest/://}" \
        | sed 's|:|/|; s|^|blobs/|' > "$stage/debian/layers.txt"
fi
data_bytes=$(du -sb "$stage" | cut -f1)
disk_mib=$(( data_bytes / 1048576 + 1024 ))
rm -f "$work/data.img"
mke2fs -q -t ext4 -d "$stage" -L esgz-data "$work/data.img" "${disk_mib}M"

# --- boot -----------------------------------------------------------------
serial_log="$work/serial.log"
log "booting ($cpus CPUs, $mem MiB, timeout ${timeout_secs}s); serial log $serial_log"
boot_started=$(date +%s)
set +e
timeout --kill-after=10 "$timeout_secs" qemu-system-x86_64 \
    -accel tcg -cpu max -smp "$cpus" -m "$mem" \
    -kernel "$vmlinuz" -initrd "$work/initramfs.gz" \
    -append "console=ttyS0 panic=-1 quiet loglevel=4" \
    -drive "file=$work/data.img,format=raw,if=virtio,cache=unsafe" \
    -nic none -nographic -no-reboot -serial stdio -monitor none \
    < /dev/null 2>&1 | tee "$serial_log" | sed -u 's/^/[vm] /' >&2
qemu_status=${PIPESTATUS[0]}
set -e
finished=$(date +%s)
if [[ -n "${VM_KEEP_LOG:-}" ]]; then
    cp "$serial_log" "$VM_KEEP_LOG"
fi

log "VM run $((finished - boot_started)) s, total $((finished - started)) s (qemu exit status $qemu_status)"
summary=$(tr -d '\r' < "$serial_log" | grep -E '^[0-9]+ passed, [0-9]+ failed$' | tail -n1 || true)
if [[ -z "$summary" ]]; then
    [[ $qemu_status -eq 124 ]] && log "the VM timed out after ${timeout_secs}s"
    echo "0 passed, 1 failed (no result line from the VM)"
    exit 1
fi
echo "$summary"
failed=$(echo "$summary" | sed -E 's/^[0-9]+ passed, ([0-9]+) failed$/\1/')
[[ "$failed" -eq 0 ]]
