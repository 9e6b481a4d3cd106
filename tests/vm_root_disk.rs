//! VM root disk test: runs `kernel-tests/vm-root-disk.sh`, which boots a
//! Debian kernel under QEMU from `esgz-nbd serve --writable` of the Debian
//! image and from a `mke2fs -d` disk file, then asserts its `N passed,
//! M failed` line.
//!
//! The run takes about a minute on two cores (QEMU without KVM). It needs
//! qemu-system-x86_64, busybox, cpio, e2fsprogs, jq, nbdfuse and apt-get, and
//! a missing tool fails the test with its name.

#[path = "support/mod.rs"]
mod support;

use support::run_vm_script;

#[test]
fn vm_boots_from_export() {
    let stdout = run_vm_script("vm-root-disk.sh", "VM root disk check");
    // The measured times and byte counts, for `cargo test -- --nocapture`.
    println!("{stdout}");
}
