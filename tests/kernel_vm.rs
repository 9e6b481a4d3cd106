//! Kernel NBD tests: runs `kernel-tests/run-vm-tests.sh`, which boots a
//! Debian kernel under QEMU and attaches, mounts, reattaches and detaches
//! images with `esgz-nbd attach`, then asserts its `N passed, M failed` line.
//!
//! The run takes several minutes (QEMU without KVM) and needs
//! qemu-system-x86_64, busybox, cpio, mke2fs and apt-get; a missing tool fails
//! the test with its name.

use std::path::Path;
use std::process::Command;

/// Parses "N passed, M failed".
fn parse_summary(line: &str) -> Option<(u32, u32)> {
    let (passed, failed) = line.trim().split_once(" passed, ")?;
    let failed = failed.strip_suffix(" failed")?;
    Some((passed.parse().ok()?, failed.parse().ok()?))
}

#[test]
fn summary_line_parses() {
    assert_eq!(parse_summary("41 passed, 0 failed"), Some((41, 0)));
    assert_eq!(parse_summary("3 passed, 2 failed\n"), Some((3, 2)));
    assert_eq!(parse_summary("passed"), None);
    assert_eq!(parse_summary("x passed, 0 failed"), None);
}

#[test]
fn kernel_nbd_in_vm() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel-tests/run-vm-tests.sh");
    let output = Command::new("bash")
        .arg(&script)
        .env("ESGZ_NBD_BIN", env!("CARGO_BIN_EXE_esgz-nbd"))
        .output()
        .unwrap_or_else(|error| panic!("failed to run {}: {error}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(80).collect();
    let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");

    let summary = stdout.lines().rev().find_map(parse_summary);
    let Some((passed, failed)) = summary else {
        panic!(
            "no result line from {} ({}); log tail:\n{tail}",
            script.display(),
            output.status
        );
    };
    assert!(passed > 0, "no VM test passed; log tail:\n{tail}");
    let failures: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|line| line.contains("FAIL: "))
        .collect();
    assert_eq!(
        failed,
        0,
        "{failed} VM tests failed:\n{}\nlog tail:\n{tail}",
        failures.join("\n")
    );
    assert!(
        output.status.success(),
        "script exit status {}; log tail:\n{tail}",
        output.status
    );
}
