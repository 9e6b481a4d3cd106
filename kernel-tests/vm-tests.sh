#!/bin/sh
# Runs inside the test VM (busybox sh, as root): attaches each image to a
# kernel NBD device, mounts it, compares the tree with its expected manifest,
# and kills and reattaches a server during reads. It then writes through a
# writable overlay, also across a killed and reattached server. Each part
# checks that detach leaves nothing behind. Ends with the line "N passed, M failed".

pass=0
fail=0
ok() { pass=$((pass + 1)); echo "PASS: $*"; }
bad() { fail=$((fail + 1)); echo "FAIL: $*"; }
check() { # check DESCRIPTION COMMAND...: passes when COMMAND succeeds
    description=$1
    shift
    if "$@"; then ok "$description"; else bad "$description"; fi
}

wait_until() { # wait_until SECONDS COMMAND...: polls COMMAND each second until it succeeds
    seconds=$1
    shift
    while ! "$@"; do
        [ "$seconds" -le 0 ] && return 1
        seconds=$((seconds - 1))
        sleep 1
    done
}

uptime_cs() { # uptime in hundredths of a second
    read -r up _ < /proc/uptime
    echo "${up%.*}${up#*.}"
}

state_field() { # state_field INDEX FIELD: a number field of the state file
    sed -n "s/^ *\"$2\": \\([0-9]*\\).*/\\1/p" "/run/esgz-nbd/nbd$1.json" 2>/dev/null
}

alive() { # alive PID: the process exists and is not a zombie
    [ -e "/proc/$1/stat" ] && ! grep -q ') [ZX] ' "/proc/$1/stat"
}

mkdir -p /data /mnt/image
if ! mount -t ext4 /dev/vda /data; then
    echo "cannot mount the data disk"
    echo "0 passed, 1 failed"
    exit 1
fi
export ESGZ_NBD_CACHE_DIR=/data/cache
echo 1 > /proc/sys/kernel/printk_ratelimit 2>/dev/null
echo "cpus: $(nproc), kernel: $(uname -r)"

check "nbd driver created /dev/nbd0" test -b /dev/nbd0

# Checks that device INDEX is fully released after detach: no server,
# no state file, size 0.
check_released() {
    index=$1
    pid=$2
    label=$3
    if alive "$pid"; then bad "$label: server $pid gone after detach"; else ok "$label: server $pid gone after detach"; fi
    check "$label: state file removed" test ! -e "/run/esgz-nbd/nbd$index.json"
    size=$(cat "/sys/block/nbd$index/size")
    check "$label: /dev/nbd$index size 0 after detach (is $size)" test "$size" = 0
}

# attach_and_check LABEL IMAGE_DIR [attach options...]: attach, mount, compare, detach.
attach_and_check() {
    label=$1
    dir=$2
    shift 2
    t0=$(uptime_cs)
    device=$(esgz-nbd -q attach "$@" "oci:$dir/oci")
    status=$?
    t1=$(uptime_cs)
    if [ $status -ne 0 ] || [ ! -b "$device" ]; then
        bad "$label: attach (status $status, device '$device')"
        return
    fi
    index=${device#/dev/nbd}
    pid=$(state_field "$index" pid)
    echo "TIME: $label: attach to readable $(state_field "$index" attach_ms) ms (command $(( (t1 - t0) * 10 )) ms) on $device"
    ok "$label: attach $device"

    if mount -t ext4 -o ro "$device" /mnt/image; then
        ok "$label: mount -o ro"
        t0=$(uptime_cs)
        if esgz-nbd -q tree-manifest /mnt/image --check "$dir/expected.manifest" --ignore /lost+found; then
            ok "$label: tree matches expected.json"
        else
            bad "$label: tree matches expected.json"
        fi
        t1=$(uptime_cs)
        echo "TIME: $label: full tree read and compare $(( (t1 - t0) * 10 )) ms"
        esgz-nbd list | sed "s/^/  list: /"
        if esgz-nbd -q detach "$device" 2>/tmp/detach.err; then
            bad "$label: detach refuses a mounted device"
        else
            grep -q "mounted" /tmp/detach.err
            check "$label: detach refuses a mounted device" test $? -eq 0
        fi
        umount /mnt/image
    else
        bad "$label: mount -o ro"
    fi
    check "$label: detach" esgz-nbd -q detach "$device"
    check_released "$index" "$pid" "$label"
}

for fixture in /data/fixtures/*; do
    attach_and_check "$(basename "$fixture")" "$fixture"
done
if [ -d /data/debian ]; then
    attach_and_check debian /data/debian
fi

# --- Debian: attach against the full pull path, in the same run ------------------
# Both paths read the image from the data disk, because the guest has no
# network. The lazy one reads through a cold cache. The full one copies each
# layer blob, unpacks it with tar, builds an ext4 image with mke2fs -d and
# loop-mounts it. Each then reads one file and runs dpkg --version from the
# image in a chroot.
if [ -d /data/debian ]; then
    export ESGZ_NBD_CACHE_DIR=/data/cache-debian-cold
    rm -rf "$ESGZ_NBD_CACHE_DIR"
    t0=$(uptime_cs)
    device=$(esgz-nbd -q attach "oci:/data/debian/oci")
    status=$?
    t1=$(uptime_cs)
    check "debian lazy path: attach (status $status)" test $status -eq 0 -a -b "$device"
    index=${device#/dev/nbd}
    pid=$(state_field "$index" pid)
    readable=$(state_field "$index" attach_ms)
    mount -t ext4 -o ro "$device" /mnt/image
    cat /mnt/image/usr/bin/dpkg > /dev/null
    t2=$(uptime_cs)
    chroot /mnt/image /usr/bin/dpkg --version > /tmp/dpkg.lazy
    check "debian lazy path: dpkg --version runs from the image" test $? -eq 0 -a -s /tmp/dpkg.lazy
    t3=$(uptime_cs)
    sleep 1 # the server rewrites its stats file within 0.2 s of a change
    fetched=$(sed -n 's/^ *"bytes_fetched": \([0-9]*\).*/\1/p' "/run/esgz-nbd/nbd$index.stats.json" | tail -n1)
    umount /mnt/image
    check "debian lazy path: detach" esgz-nbd -q detach "$device"
    check_released "$index" "$pid" "debian lazy path"
    echo "TIME: debian lazy path: attach command $(( (t1 - t0) * 10 )) ms, readable ${readable:-?} ms, first file read at $(( (t2 - t0) * 10 )) ms, dpkg --version done at $(( (t3 - t0) * 10 )) ms, ${fetched:-?} bytes fetched"
    export ESGZ_NBD_CACHE_DIR=/data/cache

    full=/data/full
    rm -rf "$full"
    mkdir -p "$full/rootfs"
    t0=$(uptime_cs)
    unpacked=0
    while read -r blob; do
        cp "/data/debian/oci/$blob" "$full/layer.tar.gz" &&
            tar -xzf "$full/layer.tar.gz" -C "$full/rootfs" &&
            unpacked=$((unpacked + 1))
        rm -f "$full/layer.tar.gz"
    done < /data/debian/layers.txt
    t1=$(uptime_cs)
    check "debian full path: copy and unpack $unpacked layer(s)" test "$unpacked" -gt 0
    size_kib=$(du -sk "$full/rootfs" | cut -f1)
    /sbin/mke2fs -q -t ext4 -d "$full/rootfs" "$full/full.img" "$((size_kib * 13 / 10 + 65536))k"
    check "debian full path: mke2fs -d" test $? -eq 0
    t2=$(uptime_cs)
    mount -t ext4 -o loop,ro "$full/full.img" /mnt/image
    check "debian full path: loop mount" test $? -eq 0
    cat /mnt/image/usr/bin/dpkg > /dev/null
    t3=$(uptime_cs)
    chroot /mnt/image /usr/bin/dpkg --version > /tmp/dpkg.full
    t4=$(uptime_cs)
    check "debian: dpkg --version prints the same on both paths" cmp -s /tmp/dpkg.lazy /tmp/dpkg.full
    umount /mnt/image
    rm -rf "$full"
    echo "TIME: debian full path: copy and unpack $(( (t1 - t0) * 10 )) ms, mke2fs -d $(( (t2 - t1) * 10 )) ms, first file read at $(( (t3 - t0) * 10 )) ms, dpkg --version done at $(( (t4 - t0) * 10 )) ms"
fi

# --- start-up prefetch: attach fetches the files before .prefetch.landmark ----------
# basic has two files before its landmark. Nothing reads the device, so every
# chunk fetched comes from the prefetch.
chunks_fetched() { # chunks_fetched INDEX: the server's fetched chunk count
    sed -n 's/^ *"chunks_fetched": \([0-9]*\).*/\1/p' "/run/esgz-nbd/nbd$1.stats.json" 2>/dev/null | tail -n1
}
prefetched() { [ "$(chunks_fetched 7)" -gt 0 ] 2>/dev/null; }
for mode in prefetch no-prefetch; do
    export ESGZ_NBD_CACHE_DIR="/data/cache-$mode"
    rm -rf "$ESGZ_NBD_CACHE_DIR"
    if [ "$mode" = prefetch ]; then
        device=$(esgz-nbd -q attach "oci:/data/fixtures/basic/oci" /dev/nbd7)
    else
        device=$(esgz-nbd -q attach --no-prefetch "oci:/data/fixtures/basic/oci" /dev/nbd7)
    fi
    check "$mode: attach" test "$device" = /dev/nbd7
    if [ "$mode" = prefetch ]; then
        # The prefetch runs after attach returns, and the server rewrites its
        # stats file within 0.2 s of a change; a loaded host slows both down.
        wait_until 60 prefetched
        fetched=$(chunks_fetched 7)
        check "prefetch: attach fetched the prioritized files without a read ($fetched chunks)" test "${fetched:-0}" -gt 0
    else
        wait_until 60 test -n "$(chunks_fetched 7)"
        sleep 3 # time for a prefetch to show in the stats file, were one running
        fetched=$(chunks_fetched 7)
        check "no-prefetch: attach --no-prefetch fetched nothing ($fetched chunks)" test "${fetched:-x}" = 0
    fi
    check "$mode: detach" esgz-nbd -q detach /dev/nbd7
done
export ESGZ_NBD_CACHE_DIR=/data/cache

# --- a chosen device, and one already in use -------------------------------
basic=/data/fixtures/basic
device=$(esgz-nbd -q attach "oci:$basic/oci" /dev/nbd5)
check "attach to a chosen device prints it" test "$device" = /dev/nbd5
if esgz-nbd -q attach "oci:$basic/oci" /dev/nbd5 2>/tmp/busy.err; then
    bad "attach to a device in use fails"
else
    grep -q "in use" /tmp/busy.err
    check "attach to a device in use fails with 'in use'" test $? -eq 0
    cat /tmp/busy.err
fi
esgz-nbd list --json > /tmp/list.json
grep -q '"device": "/dev/nbd5"' /tmp/list.json && grep -q '"server_running": true' /tmp/list.json
check "list --json shows the running device" test $? -eq 0
check "detach /dev/nbd5" esgz-nbd -q detach /dev/nbd5

# --- --record-access: the files read through the device, in first-read order ------
device=$(esgz-nbd -q attach --record-access /tmp/access.txt "oci:$basic/oci" /dev/nbd5)
check "attach --record-access prints the device" test "$device" = /dev/nbd5
# No device read-ahead, so mounting reads no file blocks next to the metadata.
blockdev --setra 0 /dev/nbd5
if mount -t ext4 -o ro /dev/nbd5 /mnt/image; then
    cat /mnt/image/bin/r_x /mnt/image/bin/exec_only /mnt/image/bin/r_x >/dev/null
    umount /mnt/image
else
    bad "record-access: mount -o ro"
fi
check "record-access: two reads recorded in order" test "$(cat /tmp/access.txt)" = "$(printf '/bin/r_x\n/bin/exec_only')"
check "record-access: the record is mode 600" test "$(stat -c %a /tmp/access.txt)" = 600
check "record-access: detach" esgz-nbd -q detach /dev/nbd5

# --- metrics per device: attach --metrics-addr, and --reattach keeps it -------------
# The initramfs brings no network up; the metrics listen on loopback.
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
if busybox --list | grep -qx wget; then
    scrape() { wget -qO- "http://127.0.0.1:$1/metrics"; }
else
    scrape() { printf 'GET /metrics HTTP/1.0\r\n\r\n' | nc 127.0.0.1 "$1"; }
fi
# metric NAME FILE: value of the series NAME of /dev/nbd4 in a scrape
metric() { sed -n "s|^$1{device=\"/dev/nbd4\",image=\"[^\"]*\"} \\([0-9]*\\)\$|\\1|p" "$2"; }
# errors FILE: esgz_nbd_errors_total of /dev/nbd4 summed over its kinds
errors() { grep '^esgz_nbd_errors_total{device="/dev/nbd4"' "$1" | awk '{ sum += $NF } END { print sum + 0 }'; }
# list_column NAME: the column NAME of the /dev/nbd4 row of `esgz-nbd list`
list_column() {
    esgz-nbd list | awk -v name="$1" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == name) column = i }
        $1 == "/dev/nbd4" { print $column }'
}
# read_all: reads every file of the mounted image past the page cache
read_all() { echo 3 > /proc/sys/vm/drop_caches; find /mnt/image -type f -exec cat {} + > /dev/null; }

port=9464
# An empty cache, so the reads fetch and the fetch counters move.
metrics_cache=/data/cache-metrics
device=$(ESGZ_NBD_CACHE_DIR=$metrics_cache esgz-nbd -q attach --timeout 5 --metrics-addr "127.0.0.1:$port" "oci:$basic/oci" /dev/nbd4)
check "metrics: attach --metrics-addr (device '$device')" test "$device" = /dev/nbd4
grep -q "\"metrics_addr\": \"127.0.0.1:$port\"" /run/esgz-nbd/nbd4.json
check "metrics: the state file records the metrics address" test $? -eq 0
old_pid=$(state_field 4 pid)
mount -t ext4 -o ro /dev/nbd4 /mnt/image
check "metrics: mount" test $? -eq 0
read_all
# The server rewrites the stats file that `list` reads within 0.2 s of a change.
# A loaded host can delay that, so wait until the file caught up with the counters.
metrics_agree() {
    scrape "$port" > /tmp/metrics.txt || return 1
    for pair in FETCHED:bytes_fetched SERVED:bytes_served REQUESTS:range_requests HITS:cache_hits MISSES:cache_misses; do
        [ "$(list_column "${pair%%:*}")" = "$(metric "esgz_nbd_${pair#*:}_total" /tmp/metrics.txt)" ] || return 1
    done
}
wait_until 30 metrics_agree
check "metrics: scrape with $(command -v wget >/dev/null && echo wget || echo nc)" test -s /tmp/metrics.txt
served=$(metric esgz_nbd_bytes_served_total /tmp/metrics.txt)
check "metrics: bytes served labelled device=/dev/nbd4 ($served)" test "${served:-0}" -gt 0
fetched=$(metric esgz_nbd_bytes_fetched_total /tmp/metrics.txt)
check "metrics: bytes fetched labelled device=/dev/nbd4 ($fetched)" test "${fetched:-0}" -gt 0
esgz-nbd list | sed "s/^/  list: /"
for pair in FETCHED:bytes_fetched SERVED:bytes_served REQUESTS:range_requests HITS:cache_hits MISSES:cache_misses; do
    column=${pair%%:*}
    value=$(metric "esgz_nbd_${pair#*:}_total" /tmp/metrics.txt)
    listed=$(list_column "$column")
    check "metrics: list $column ($listed) equals the scraped value ($value)" test -n "$value" -a "$listed" = "$value"
done
listed=$(list_column ERRORS)
check "metrics: list ERRORS ($listed) equals the scraped errors ($(errors /tmp/metrics.txt))" test "$listed" = "$(errors /tmp/metrics.txt)"

kill -9 "$old_pid"
sleep 1
device=$(ESGZ_NBD_CACHE_DIR=$metrics_cache esgz-nbd -q attach --timeout 5 --reattach /dev/nbd4 "oci:$basic/oci")
check "metrics: attach --reattach without --metrics-addr (device '$device')" test "$device" = /dev/nbd4
new_pid=$(state_field 4 pid)
read_all
scrape "$port" > /tmp/metrics-reattached.txt
served=$(metric esgz_nbd_bytes_served_total /tmp/metrics-reattached.txt)
check "metrics: the reattached server serves device=/dev/nbd4 on the recorded address ($served bytes served)" test "${served:-0}" -gt 0
umount /mnt/image
check "metrics: detach" esgz-nbd -q detach /dev/nbd4
check_released 4 "$new_pid" "metrics"

# --- errors -------------------------------------------------------------------
if esgz-nbd -q attach oci:/data/does-not-exist 2>/tmp/missing.err; then
    bad "attach of a missing image fails"
else
    grep -q "failed to open image" /tmp/missing.err
    check "attach of a missing image fails with a clear message" test $? -eq 0
    cat /tmp/missing.err
fi
check "no state left after failed attaches" test -z "$(ls /run/esgz-nbd/ 2>/dev/null | grep '\.json$')"

# --- the ioctl interface ------------------------------------------------------------
attach_and_check "basic (ioctl)" "$basic" --interface ioctl

# --- SIGKILL the server during reads, then --reattach --------------------------------
large=/data/fixtures/large
export ESGZ_NBD_CACHE_DIR=/data/cache-reattach
device=$(esgz-nbd -q attach --timeout 5 "oci:$large/oci" /dev/nbd3)
index=3
old_pid=$(state_field 3 pid)
mount -t ext4 -o ro /dev/nbd3 /mnt/image
check "reattach: attach and mount" test $? -eq 0
expected=$(awk -F '\t' '$1 == "/big/compressible.bin" {print $9}' "$large/expected.manifest")
echo 3 > /proc/sys/vm/drop_caches
(sha256sum /mnt/image/big/compressible.bin > /tmp/reader.out 2>/tmp/reader.err; echo $? > /tmp/reader.status) &
reader=$!
sleep 2
fetched_before=$(grep -o '"bytes_fetched": [0-9]*' /run/esgz-nbd/nbd3.stats.json | tail -n1)
kill -9 "$old_pid"
echo "killed server $old_pid during the read ($fetched_before)"
sleep 1
check "reattach: reader still running after the kill" test ! -e /tmp/reader.status
t0=$(uptime_cs)
device=$(esgz-nbd -q attach --timeout 5 --reattach /dev/nbd3 "oci:$large/oci")
status=$?
t1=$(uptime_cs)
check "reattach: attach --reattach succeeds (status $status, $(( (t1 - t0) * 10 )) ms)" test $status -eq 0 -a "$device" = /dev/nbd3
new_pid=$(state_field 3 pid)
check "reattach: a new server runs ($old_pid -> $new_pid)" alive "$new_pid"
wait "$reader"
check "reattach: the reader saw no error (status $(cat /tmp/reader.status))" test "$(cat /tmp/reader.status)" = 0
cat /tmp/reader.err
actual=$(cut -d' ' -f1 /tmp/reader.out)
check "reattach: the data read across the restart is intact" test "$actual" = "$expected"
esgz-nbd list | sed "s/^/  list: /"
check "reattach: no I/O errors in the kernel log" test -z "$(dmesg | grep -i 'I/O error')"
umount /mnt/image
check "reattach: detach" esgz-nbd -q detach /dev/nbd3
check_released 3 "$new_pid" "reattach"

# --- writable: the overlay keeps writes across detach and attach -----------------
export ESGZ_NBD_CACHE_DIR=/data/cache
overlay=/data/overlays/basic.ovl
written=/mnt/image/written

# attach_writable LABEL [DEVICE] [attach options...]: attach basic writable;
# sets device, index, pid.
attach_writable() {
    label=$1
    shift
    device=$(esgz-nbd -q attach --writable --size 256M "oci:$basic/oci" "$@")
    status=$?
    check "$label: attach --writable (status $status, device '$device')" test $status -eq 0 -a -b "$device"
    index=${device#/dev/nbd}
    pid=$(state_field "$index" pid)
}

# mount_rw LABEL: mounts $device read-write and checks that ext4 loaded its journal.
mount_rw() {
    mount -t ext4 -o rw "$device" /mnt/image
    check "$1: mount -o rw" test $? -eq 0
    grep -q "^$device /mnt/image ext4 rw[,]" /proc/mounts
    check "$1: mounted read-write" test $? -eq 0
    dmesg | grep "nbd$index" | tail -n1 | grep -Eq '(ordered|journalled|writeback) data mode'
    check "$1: ext4 loaded the journal ($(dmesg | grep "nbd$index" | tail -n1))" test $? -eq 0
}

rm -rf /data/overlays
attach_writable "writable" --overlay "$overlay"
check "writable: /dev/nbd$index is not read-only" test "$(cat "/sys/block/nbd$index/ro")" = 0
grep -q '"mode": "rw"' "/run/esgz-nbd/nbd$index.json"
check "writable: state file records mode rw" test $? -eq 0
grep -q "\"overlay\": \"$overlay\"" "/run/esgz-nbd/nbd$index.json"
check "writable: state file records the overlay path" test $? -eq 0
esgz-nbd list | sed "s/^/  list: /"
esgz-nbd list | grep -Eq "^$device +running +rw "
check "writable: list shows mode rw" test $? -eq 0
check "writable: overlay mode 0600" test "$(stat -c %a "$overlay")" = 600
mount_rw "writable"
mkdir -p "$written"
dd if=/dev/urandom of="$written/random.bin" bs=64k count=64 2>/dev/null
echo "hello from the writable attach" > "$written/hello.txt"
cp "$(find /mnt/image -type f ! -path "$written/*" | head -n1)" "$written/copy.txt"
sha256sum "$written"/* > /tmp/written.sums
sync
check "writable: the image tree is intact after writes" \
    esgz-nbd -q tree-manifest /mnt/image --check "$basic/expected.manifest" --ignore /lost+found --ignore /written
umount /mnt/image
check "writable: detach" esgz-nbd -q detach "$device"
check_released "$index" "$pid" "writable"
check "writable: the overlay stays after detach" test -s "$overlay"

attach_writable "writable again" --overlay "$overlay"
mount_rw "writable again"
check "writable again: files written before detach are there, content equal" sha256sum -c -s /tmp/written.sums
umount /mnt/image
check "writable again: detach" esgz-nbd -q detach "$device"
check_released "$index" "$pid" "writable again"

# --- writable: SIGKILL the server after a sync, then --reattach --------------------
overlay=/data/overlays/reattach.ovl
attach_writable "writable reattach" /dev/nbd6 --timeout 5 --overlay "$overlay"
old_pid=$pid
mount_rw "writable reattach"
mkdir -p "$written"
dd if=/dev/urandom of="$written/before-kill.bin" bs=64k count=32 2>/dev/null
echo "synced before the kill" > "$written/before-kill.txt"
sha256sum "$written"/* > /tmp/before-kill.sums
sync
kill -9 "$old_pid"
echo "killed writable server $old_pid after the sync"
sleep 1
if esgz-nbd -q attach --reattach /dev/nbd6 --writable --overlay /data/overlays/other.ovl "oci:$basic/oci" 2>/tmp/other.err; then
    bad "writable reattach: another overlay is rejected"
else
    cat /tmp/other.err
    grep -q "overlay" /tmp/other.err
    check "writable reattach: another overlay is rejected" test $? -eq 0
fi
device=$(esgz-nbd -q attach --timeout 5 --reattach /dev/nbd6 "oci:$basic/oci")
status=$?
check "writable reattach: attach --reattach succeeds (status $status)" test $status -eq 0 -a "$device" = /dev/nbd6
new_pid=$(state_field 6 pid)
check "writable reattach: a new server runs ($old_pid -> $new_pid)" alive "$new_pid"
grep -q '"mode": "rw"' /run/esgz-nbd/nbd6.json && grep -q "\"overlay\": \"$overlay\"" /run/esgz-nbd/nbd6.json
check "writable reattach: the state keeps mode rw and the overlay" test $? -eq 0
echo 3 > /proc/sys/vm/drop_caches
check "writable reattach: files synced before the kill are there" sha256sum -c -s /tmp/before-kill.sums
dd if=/dev/urandom of="$written/after-reattach.bin" bs=64k count=16 2>/dev/null
sha256sum "$written"/* > /tmp/after-reattach.sums
sync
echo 3 > /proc/sys/vm/drop_caches
check "writable reattach: the mount keeps working (write, sync, read back)" sha256sum -c -s /tmp/after-reattach.sums
check "writable reattach: no I/O errors in the kernel log" test -z "$(dmesg | grep -i 'I/O error')"
umount /mnt/image
check "writable reattach: detach" esgz-nbd -q detach /dev/nbd6
check_released 6 "$new_pid" "writable reattach"
check "writable reattach: no ext4 errors in the kernel log" test -z "$(dmesg | grep 'EXT4-fs error')"
# A fresh attach of the same overlay shows the writes from before the kill
# (acknowledged, synced, but their in-place metadata never flushed by the
# killed server) and from after the reattach.
attach_writable "writable reattach, fresh attach" --overlay "$overlay"
mount_rw "writable reattach, fresh attach"
check "writable reattach, fresh attach: files written before and after the kill are there" \
    sha256sum -c -s /tmp/after-reattach.sums
umount /mnt/image
check "writable reattach, fresh attach: detach" esgz-nbd -q detach "$device"
check_released "$index" "$pid" "writable reattach, fresh attach"

# --- writable with a temporary overlay ----------------------------------------------
attach_writable "temporary overlay"
temporary=$(sed -n 's/^ *"overlay": "\(.*\)",*$/\1/p' "/run/esgz-nbd/nbd$index.json")
check "temporary overlay: state file records it ($temporary)" test -f "$temporary"
grep -q '"overlay_temporary": true' "/run/esgz-nbd/nbd$index.json"
check "temporary overlay: state file marks it temporary" test $? -eq 0
mount_rw "temporary overlay"
echo "scratch" > /mnt/image/scratch.txt
sync
umount /mnt/image
check "temporary overlay: detach" esgz-nbd -q detach "$device"
check_released "$index" "$pid" "temporary overlay"
check "temporary overlay: removed at detach" test ! -e "$temporary" -a ! -e "$(dirname "$temporary")"
check "no state left after the writable tests" test -z "$(ls /run/esgz-nbd/ 2>/dev/null | grep '\.json$')"

echo "--- kernel messages about nbd ---"
dmesg | grep -i nbd | tail -n 20
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
