#!/bin/sh
# Runs inside the test VM (busybox sh, as root): attaches each image to a
# kernel NBD device, mounts it, compares the tree with its expected manifest,
# kills and reattaches a server during reads, and checks that detach leaves
# nothing behind. Ends with the line "N passed, M failed".

pass=0
fail=0
ok() { pass=$((pass + 1)); echo "PASS: $*"; }
bad() { fail=$((fail + 1)); echo "FAIL: $*"; }
check() { # check DESCRIPTION COMMAND...: passes when COMMAND succeeds
    description=$1
    shift
    if "$@"; then ok "$description"; else bad "$description"; fi
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

echo "--- kernel messages about nbd ---"
dmesg | grep -i nbd | tail -n 20
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
