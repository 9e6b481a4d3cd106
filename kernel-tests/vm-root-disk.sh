#!/usr/bin/env bash
# Boots a QEMU VM whose root disk is the Debian image served by
# `esgz-nbd serve --writable` (QEMU reads the export from a unix socket with
# its own NBD client), and compares it with the full pull path in the same
# run: unpack the layer blob, `mke2fs -d` a raw disk file, boot from that.
#
# Both VMs boot Debian's linux-image-amd64 kernel (cached under
# target/kernel-tests/) with a busybox initramfs that loads virtio_blk and
# ext4, mounts /dev/vda read-write and runs bash from the image under chroot.
# bash prints "VMROOT shell", runs `dpkg --version` from the image, writes a
# token into /root/written-by-vm, syncs and prints "VMROOT done"; the
# initramfs then unmounts the root and powers off. The host timestamps every
# serial line from the start of QEMU, so "time to shell" is the time from
# starting QEMU to the "VMROOT shell" line. After the lazy VM the server is
# restarted on the same overlay and the host reads the token back through
# nbdfuse and a read-only loop mount.
#
# Prints the times, the bytes fetched against the blob size and the line
# "N passed, M failed"; exits 0 only when nothing failed. Everything it
# creates lives in one scratch directory that is removed on exit, together
# with the processes, mounts and loop devices it started.
#
# Environment:
#   ESGZ_SHARED       directory with images/ [../shared next to the crate,
#                     else /work/shared]
#   ESGZ_NBD_BIN      binary to test [target/release/esgz-nbd, built if missing
#                     or older than the sources]
#   VM_TIMEOUT        seconds before each VM is killed [300]
#   VM_CPUS, VM_MEM   guest CPUs [2] and memory in MiB [1024]
#   VM_FREE_SPACE     free space of both root filesystems in MiB: `serve
#                     --size` and the room mke2fs gets beyond the tree [256]
#   VM_KEEP_LOG       directory to copy the serial logs and stats files to
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
timeout_secs=${VM_TIMEOUT:-300}
cpus=${VM_CPUS:-2}
mem=${VM_MEM:-1024}
free_mib=${VM_FREE_SPACE:-256}

log() { printf '[vm-root-disk] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }

source "$root/kernel-tests/lib.sh"

vm_require_tools qemu-system-x86_64 busybox cpio gzip mke2fs e2fsck debugfs \
    apt-get apt-cache dpkg-deb tar jq nbdfuse fusermount3 losetup mount \
    umount mountpoint timeout flock mkfifo
shared=$(vm_find_shared "$root")
image_dir="$shared/images/debian-bookworm-minbase/oci"
[[ -f "$image_dir/index.json" ]] || die "the Debian image layout $image_dir is missing"

# --- scratch directory and cleanup ------------------------------------------
mkdir -p "$root/target"
scratch=$(mktemp -d "$root/target/vm-root-disk.XXXXXX")
qemu_pid= server_pid= nbdfuse_pid= loop_dev=
stop_pid() { # stop_pid PID: SIGTERM, then SIGKILL after 10 s
    local pid=$1 i
    [[ -n "$pid" ]] || return 0
    kill "$pid" 2>/dev/null || return 0
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    set +e
    stop_pid "$qemu_pid"
    mountpoint -q "$scratch/mnt" 2>/dev/null && umount "$scratch/mnt"
    [[ -n "$loop_dev" ]] && losetup -d "$loop_dev"
    if [[ -n "$nbdfuse_pid" ]]; then
        fusermount3 -u "$scratch/fuse" 2>/dev/null || umount "$scratch/fuse" 2>/dev/null
        stop_pid "$nbdfuse_pid"
    fi
    stop_pid "$server_pid"
    if [[ -n "${VM_KEEP_LOG:-}" ]]; then
        mkdir -p "$VM_KEEP_LOG"
        cp "$scratch"/*.log "$scratch"/*.json "$VM_KEEP_LOG"/ 2>/dev/null
    fi
    rm -rf "$scratch"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

passed=0
failed=0
pass() { passed=$((passed + 1)); log "PASS: $*"; }
fail() { failed=$((failed + 1)); log "FAIL: $*"; }

# --- binary -----------------------------------------------------------------
bin=${ESGZ_NBD_BIN:-$root/target/release/esgz-nbd}
if [[ -z "${ESGZ_NBD_BIN:-}" ]]; then
    newest_source=$(find "$root/src" "$root/Cargo.toml" -newer "$bin" -print -quit 2>/dev/null || true)
    if [[ ! -x "$bin" || -n "$newest_source" ]]; then
        log "building the release binary"
        (cd "$root" && cargo build --release --bin esgz-nbd >&2)
    fi
fi
[[ -x "$bin" ]] || die "binary $bin not found"
"$bin" serve --help | grep -q -- '--writable' \
    || die "$bin has no 'serve --writable'; the root disk needs a writable export"

# --- kernel and initramfs -----------------------------------------------------
vm_fetch_kernel "$root/target/kernel-tests"
# ext4 finds crc32c through the crypto API at mount time, not through depends=.
vm_resolve_modules virtio_pci virtio_blk crc32c_generic ext4
initramfs_dir="$scratch/initramfs"
vm_initramfs_base "$initramfs_dir"
mkdir -p "$initramfs_dir/newroot"
cat > "$initramfs_dir/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "VMROOT initramfs"
while read -r module; do
    insmod "/modules/$module.ko" || echo "VMROOT insmod $module failed"
done < /modules/order
token=
for word in $(cat /proc/cmdline); do
    case $word in vmroot_token=*) token=${word#vmroot_token=} ;; esac
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
done
if mount -t ext4 -o rw /dev/vda /newroot; then
    echo "VMROOT mounted"
    mount -t proc proc /newroot/proc
    mount -o bind /dev /newroot/dev
    # Everything in this script runs from the image, not from busybox.
    chroot /newroot /bin/bash -c '
        echo "VMROOT shell $BASH_VERSION"
        if version=$(dpkg --version); then
            echo "VMROOT dpkg ${version%%$'"'\n'"'*}"
        fi
        if echo "$1" > /root/written-by-vm && sync; then
            echo "VMROOT wrote $(cat /root/written-by-vm)"
        fi
        echo "VMROOT done"
    ' vmroot "$token"
    echo "VMROOT chroot exit status $?"
    # The host copies the server counters during this pause.
    sleep 2
    umount /newroot/dev /newroot/proc
    umount /newroot && echo "VMROOT unmounted"
else
    echo "VMROOT mount of /dev/vda failed"
fi
poweroff -f
EOF
chmod +x "$initramfs_dir/init"
vm_pack_initramfs "$initramfs_dir" "$scratch/initramfs.gz"

# --- helpers ------------------------------------------------------------------
now_us() { local t=$EPOCHREALTIME; echo "${t/[.,]/}"; }
seconds() { printf '%d.%03d' $(($1 / 1000000)) $(($1 % 1000000 / 1000)); }

# stamp_serial START_US LOG [ON_DONE]: prefixes each serial line with the
# microseconds since START_US, writes it to LOG and to stderr. ON_DONE, a
# command, runs in the background when the line "VMROOT done" arrives.
stamp_serial() {
    local start=$1 out=$2 on_done=${3:-} line
    while IFS= read -r line; do
        line=${line%$'\r'}
        printf '%s %s\n' "$(($(now_us) - start))" "$line" >> "$out"
        printf '[vm] %s\n' "$line" >&2
        if [[ -n "$on_done" && "$line" == *"VMROOT done" ]]; then
            (eval "$on_done") &
            on_done_pid=$!
        fi
    done
}

# boot_vm NAME DRIVE TOKEN [ON_DONE]: boots the VM with DRIVE as its -drive
# and waits until it powers off or VM_TIMEOUT passes. The serial log with
# timestamps is $scratch/NAME.log.
boot_vm() {
    local name=$1 drive=$2 token=$3 on_done=${4:-} start status
    on_done_pid=
    rm -f "$scratch/$name.fifo" "$scratch/$name.log"
    mkfifo "$scratch/$name.fifo"
    : > "$scratch/$name.log"
    log "booting $name ($cpus CPUs, $mem MiB, timeout ${timeout_secs}s): -drive $drive"
    start=$(now_us)
    timeout --kill-after=10 "$timeout_secs" qemu-system-x86_64 \
        -accel tcg -cpu max -smp "$cpus" -m "$mem" \
        -kernel "$vmlinuz" -initrd "$scratch/initramfs.gz" \
        -append "console=ttyS0 panic=-1 quiet loglevel=4 vmroot_token=$token" \
        -drive "$drive" \
        -nic none -nographic -no-reboot -serial stdio -monitor none \
        < /dev/null > "$scratch/$name.fifo" 2>&1 &
    qemu_pid=$!
    stamp_serial "$start" "$scratch/$name.log" "$on_done" < "$scratch/$name.fifo"
    set +e
    wait "$qemu_pid"
    status=$?
    set -e
    qemu_pid=
    [[ -n "$on_done_pid" ]] && wait "$on_done_pid"
    [[ $status -eq 124 ]] && log "$name: the VM timed out after ${timeout_secs}s"
    log "$name: qemu exit status $status"
}

# marker_us NAME MARKER: the timestamp of the first serial line of NAME that
# contains MARKER, or nothing. marker_text prints that line from MARKER on,
# without the terminal escape sequences that may come before it.
marker_us() {
    awk -v marker="$2" 'index($0, marker) > 0 { print $1; exit }' "$scratch/$1.log"
}
marker_text() {
    awk -v marker="$2" 'index($0, marker) > 0 { print substr($0, index($0, marker)); exit }' "$scratch/$1.log"
}

# check_guest NAME TOKEN: the checks shared by both boots.
check_guest() {
    local name=$1 token=$2 dpkg_line
    if [[ -n "$(marker_us "$name" "VMROOT shell ")" ]]; then
        pass "$name: bash from the image started"
    else
        fail "$name: no shell line on the serial console"
    fi
    dpkg_line=$(marker_text "$name" "VMROOT dpkg ")
    if [[ "$dpkg_line" == *"Debian 'dpkg' package management program version"* ]]; then
        pass "$name: dpkg --version ran from the image (${dpkg_line#VMROOT dpkg })"
    else
        fail "$name: dpkg --version printed no version line"
    fi
    if [[ "$(marker_text "$name" "VMROOT wrote ")" == "VMROOT wrote $token" ]]; then
        pass "$name: the guest wrote and read back /root/written-by-vm"
    else
        fail "$name: the guest could not write /root/written-by-vm"
    fi
    if [[ -n "$(marker_us "$name" "VMROOT unmounted")" ]]; then
        pass "$name: the guest unmounted its root"
    else
        fail "$name: the guest did not unmount its root"
    fi
}

wait_for_socket() { # wait_for_socket PATH PID: up to 60 s
    local i
    for i in $(seq 1 1200); do
        [[ -S "$1" ]] && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

start_server() { # start_server NAME: serves the image on $scratch/nbd.sock
    rm -f "$scratch/nbd.sock"
    "$bin" -q serve "oci:$image_dir:latest" --socket "$scratch/nbd.sock" \
        --cache-dir "$scratch/cache-$1" --stats-file "$scratch/$1-stats.json" \
        --writable --overlay "$scratch/overlay" --size "${free_mib}M" \
        > /dev/null 2> "$scratch/$1-server.log" &
    server_pid=$!
    wait_for_socket "$scratch/nbd.sock" "$server_pid"
}

stop_server() {
    stop_pid "$server_pid"
    server_pid=
}

stat_field() { jq -r "$2 // 0" "$1" 2>/dev/null || echo 0; }

blob_digest=$(jq -r '.manifests[0].digest' "$image_dir/index.json")
layer_digest=$(jq -r '.layers[0].digest' "$image_dir/blobs/${blob_digest/://}")
blob="$image_dir/blobs/${layer_digest/://}"
blob_size=$(stat -c %s "$blob")
lazy_token="lazy-$RANDOM$RANDOM"
full_token="full-$RANDOM$RANDOM"

# --- lazy path: esgz-nbd serve --writable -------------------------------------
serve_started=$(now_us)
if start_server lazy; then
    serve_ready_us=$(($(now_us) - serve_started))
    pass "lazy: server ready in $(seconds "$serve_ready_us") s"
    boot_vm lazy "file=nbd:unix:$scratch/nbd.sock,format=raw,if=virtio" "$lazy_token" \
        "sleep 1.5; cp '$scratch/lazy-stats.json' '$scratch/lazy-stats-at-done.json'"
    stop_server
    check_guest lazy "$lazy_token"
else
    serve_ready_us=0
    fail "lazy: the server did not open its socket: $(tail -n 5 "$scratch/lazy-server.log")"
    stop_server
fi

lazy_shell_us=$(marker_us lazy "VMROOT shell ")
lazy_done_us=$(marker_us lazy "VMROOT done")
done_stats="$scratch/lazy-stats-at-done.json"
[[ -f "$done_stats" ]] || done_stats="$scratch/lazy-stats.json"
startup_bytes=$(stat_field "$done_stats" .startup.bytes_fetched)
store_bytes=$(stat_field "$done_stats" .store.bytes_fetched)
lazy_bytes=$((startup_bytes + store_bytes))
final_bytes=$(($(stat_field "$scratch/lazy-stats.json" .startup.bytes_fetched) \
    + $(stat_field "$scratch/lazy-stats.json" .store.bytes_fetched)))
if [[ $lazy_bytes -gt 0 && $lazy_bytes -lt $blob_size ]]; then
    pass "lazy: fetched $lazy_bytes of $blob_size blob bytes to boot, run dpkg and write"
else
    fail "lazy: fetched $lazy_bytes bytes, expected more than 0 and less than the blob's $blob_size"
fi

# The overlay keeps the guest's write: a new server on the same overlay
# shows it to a host mount.
if start_server verify; then
    mkdir -p "$scratch/fuse" "$scratch/mnt"
    nbdfuse --readonly "$scratch/fuse/disk" "nbd+unix:///?socket=$scratch/nbd.sock" &
    nbdfuse_pid=$!
    for _ in $(seq 1 200); do
        [[ -f "$scratch/fuse/disk" ]] && break
        sleep 0.05
    done
    if e2fsck -fn "$scratch/fuse/disk" > "$scratch/verify-e2fsck.log" 2>&1; then
        pass "lazy: e2fsck -fn finds the written filesystem clean"
    else
        fail "lazy: e2fsck -fn reports errors: $(tail -n 5 "$scratch/verify-e2fsck.log")"
    fi
    loop_dev=$(losetup --find --show --read-only "$scratch/fuse/disk")
    written=
    if mount -t ext4 -o ro "$loop_dev" "$scratch/mnt"; then
        written=$(cat "$scratch/mnt/root/written-by-vm" 2>/dev/null || true)
        umount "$scratch/mnt"
    fi
    losetup -d "$loop_dev"
    loop_dev=
    if [[ "$written" == "$lazy_token" ]]; then
        pass "lazy: the host reads the guest's file after a server restart"
    else
        fail "lazy: /root/written-by-vm after a restart is '${written}', expected '$lazy_token'"
    fi
    fusermount3 -u "$scratch/fuse" 2>/dev/null || umount "$scratch/fuse"
    stop_pid "$nbdfuse_pid"
    nbdfuse_pid=
    stop_server
else
    fail "lazy: the server did not restart on the overlay: $(tail -n 5 "$scratch/verify-server.log")"
    stop_server
fi

# --- full pull path: unpack the blob, mke2fs -d, boot the raw file ---------------
mkdir -p "$scratch/tree"
unpack_started=$(now_us)
# The eStargz TOC and landmark entries are not part of the image's tree.
tar -xzf "$blob" -C "$scratch/tree" --numeric-owner \
    --exclude=./stargz.index.json --exclude=stargz.index.json \
    --exclude=.prefetch.landmark --exclude=.no.prefetch.landmark
unpack_us=$(($(now_us) - unpack_started))
mkfs_started=$(now_us)
tree_mib=$(du -sm "$scratch/tree" | cut -f1)
mke2fs -q -t ext4 -d "$scratch/tree" -L debian "$scratch/disk.img" "$((tree_mib + free_mib))M" >&2
mkfs_us=$(($(now_us) - mkfs_started))
rm -rf "$scratch/tree"
# Write the new file back before the boot, so that writeback does not
# compete with the VM for the CPU.
sync
pass "full: unpacked in $(seconds "$unpack_us") s, mke2fs -d in $(seconds "$mkfs_us") s"
boot_vm full "file=$scratch/disk.img,format=raw,if=virtio" "$full_token"
check_guest full "$full_token"
full_shell_us=$(marker_us full "VMROOT shell ")
full_done_us=$(marker_us full "VMROOT done")
written=$(debugfs -R 'cat /root/written-by-vm' "$scratch/disk.img" 2>/dev/null || true)
if [[ "$written" == "$full_token" ]]; then
    pass "full: the host reads the guest's file from the disk file"
else
    fail "full: /root/written-by-vm in the disk file is '${written}', expected '$full_token'"
fi

# --- report -----------------------------------------------------------------------
show() { if [[ -n "$1" ]]; then seconds "$1"; else echo "none"; fi; }
# phases NAME: QEMU start to the initramfs (firmware and kernel boot, which do
# not depend on the disk), initramfs to the shell (modules, mount, bash and
# its libraries), shell to done (dpkg --version, the write and sync).
phases() {
    local initramfs shell done
    initramfs=$(marker_us "$1" "VMROOT initramfs")
    shell=$(marker_us "$1" "VMROOT shell ")
    done=$(marker_us "$1" "VMROOT done")
    if [[ -n "$initramfs" && -n "$shell" && -n "$done" ]]; then
        echo "kernel $(seconds "$initramfs") s + root mount and bash $(seconds $((shell - initramfs))) s" \
            "+ dpkg and write $(seconds $((done - shell))) s"
    else
        echo "incomplete (see the serial log)"
    fi
}
echo "lazy (esgz-nbd serve --writable): server ready $(seconds "$serve_ready_us") s," \
    "shell $(show "$lazy_shell_us") s, done $(show "$lazy_done_us") s after QEMU start: $(phases lazy)"
echo "lazy bytes fetched to boot, run dpkg and write: $lazy_bytes (startup $startup_bytes, chunks $store_bytes)" \
    "of a $blob_size byte blob ($((lazy_bytes * 1000 / blob_size / 10)).$((lazy_bytes * 1000 / blob_size % 10))%);" \
    "$final_bytes at server exit"
echo "full pull (tar -xzf, mke2fs -d): unpack $(seconds "$unpack_us") s, mke2fs $(seconds "$mkfs_us") s," \
    "shell $(show "$full_shell_us") s, done $(show "$full_done_us") s after QEMU start: $(phases full);" \
    "$blob_size bytes read"
if [[ -n "$lazy_shell_us" && -n "$full_shell_us" ]]; then
    echo "to the shell, setup plus boot: lazy $(seconds $((serve_ready_us + lazy_shell_us))) s," \
        "full pull $(seconds $((unpack_us + mkfs_us + full_shell_us))) s"
fi
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
