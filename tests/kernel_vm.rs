//! Kernel NBD tests: runs `kernel-tests/run-vm-tests.sh`, which boots a
//! Debian kernel under QEMU and attaches, mounts, reattaches and detaches
//! images with `esgz-nbd attach`, then asserts its `N passed, M failed` line.
//!
//! The run takes several minutes (QEMU without KVM) and needs
//! qemu-system-x86_64, busybox, cpio, mke2fs and apt-get; a missing tool fails
//! the test with its name.

#[path = "support/mod.rs"]
mod support;

use support::{parse_summary, run_vm_script};

#[test]
fn summary_line_parses() {
    let cases = [
        ("41 passed, 0 failed", Some((41, 0))),
        ("3 passed, 2 failed\n", Some((3, 2))),
        ("passed", None),
        ("x passed, 0 failed", None),
        ("1 passed, 0 failures", None),
    ];
    for (line, expected) in cases {
        assert_eq!(parse_summary(line), expected, "line {line:?}");
    }
}

#[test]
fn kernel_nbd_in_vm() {
    run_vm_script("run-vm-tests.sh", "VM test");
}
