#!/usr/bin/env bash
# Benchmarks booting a VM from the Debian image by running
# kernel-tests/vm-root-disk.sh RUNS times with the release binary. Prints the
# machine, the date and each run's numbers, then the median time to the shell
# of the lazy path (esgz-nbd serve --writable) and of the full pull path
# (tar -xzf, mke2fs -d).
#
#   scripts/bench/vm-root-disk.sh [RUNS]     (default 3)
#
# The VM environment variables of kernel-tests/vm-root-disk.sh apply.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
runs=${1:-3}
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "vm-root-disk bench: RUNS must be a positive integer, got '$runs'" >&2; exit 2; }

(cd "$root" && cargo build --release --bin esgz-nbd >&2)

echo "# date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "# machine: $(nproc) CPUs, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)," \
    "$(free -g | awk '/^Mem:/ { print $2 }') GiB, kernel $(uname -r)"
echo "# qemu: $(qemu-system-x86_64 --version | head -n1)"
echo "# command: ESGZ_NBD_BIN=target/release/esgz-nbd kernel-tests/vm-root-disk.sh"

results=$(mktemp)
trap 'rm -f "$results"' EXIT
for run in $(seq 1 "$runs"); do
    echo "## run $run"
    ESGZ_NBD_BIN="$root/target/release/esgz-nbd" "$root/kernel-tests/vm-root-disk.sh" 2>/dev/null \
        | tee -a "$results" || echo "# run $run failed; its numbers may be incomplete"
done

# median FIELD_PATTERN: the median of the seconds that follow the pattern on
# the "to the shell" lines.
median() {
    sed -n "s/.*$1 \\([0-9.]*\\) s.*/\\1/p" "$results" | sort -n \
        | awk '{ value[NR] = $1 } END { if (NR) print value[int((NR + 1) / 2)]; else print "none" }'
}
echo "# median to the shell, setup plus boot, over $runs runs:" \
    "lazy $(median 'setup plus boot: lazy') s, full pull $(median 'full pull') s"
