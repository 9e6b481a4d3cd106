//! VM root disk test: runs `kernel-tests/vm-root-disk.sh`, which boots a
//! Debian kernel under QEMU from `esgz-nbd serve --writable` of the Debian
//! image and from a `mke2fs -d` disk file, then asserts its `N passed,
//! M failed` line.
//!
//! The run takes about a minute on two cores (QEMU without KVM). It needs
//! qemu-system-x86_64, busybox, cpio, e2fsprogs, jq, nbdfuse and apt-get, and
//! a missing tool fails the test with its name.

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
    let cases = [
        ("13 passed, 0 failed", Some((13, 0))),
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
fn vm_boots_from_export() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel-tests/vm-root-disk.sh");
    let output = Command::new("bash")
        .arg(&script)
        .env("ESGZ_NBD_BIN", env!("CARGO_BIN_EXE_esgz-nbd"))
        .output()
        .unwrap_or_else(|error| panic!("failed to run {}: {error}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(80).collect();
    let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
    // The measured times and byte counts, for `cargo test -- --nocapture`.
    println!("{stdout}");

    let summary = stdout.lines().rev().find_map(parse_summary);
    let Some((passed, failed)) = summary else {
        panic!(
            "no result line from {} ({}); log tail:\n{tail}",
            script.display(),
            output.status
        );
    };
    assert!(
        passed > 0,
        "no VM root disk check passed; log tail:\n{tail}"
    );
    assert_eq!(
        failed, 0,
        "{failed} VM root disk checks failed; log tail:\n{tail}"
    );
    assert!(
        output.status.success(),
        "script exit status {}; log tail:\n{tail}",
        output.status
    );
}
