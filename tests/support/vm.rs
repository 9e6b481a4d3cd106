//! Runs a script under kernel-tests/ that boots a QEMU VM and ends with the
//! line `N passed, M failed`, and asserts that line.

use std::path::Path;
use std::process::Command;

/// Parses "N passed, M failed".
pub fn parse_summary(line: &str) -> Option<(u32, u32)> {
    let (passed, failed) = line.trim().split_once(" passed, ")?;
    let failed = failed.strip_suffix(" failed")?;
    Some((passed.parse().ok()?, failed.parse().ok()?))
}

/// Runs `kernel-tests/SCRIPT` with the esgz-nbd binary under test and asserts that
/// at least one check passed, none failed and the script succeeded. A failure names
/// each failed check (`FAIL: ` lines) and shows the end of the log; `check_name`
/// is what the messages call one check. Returns the script's standard output.
pub fn run_vm_script(script: &str, check_name: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("kernel-tests")
        .join(script);
    let output = Command::new("bash")
        .arg(&script)
        .env("ESGZ_NBD_BIN", env!("CARGO_BIN_EXE_esgz-nbd"))
        .output()
        .unwrap_or_else(|error| panic!("failed to run {}: {error}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
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
    assert!(passed > 0, "no {check_name} passed; log tail:\n{tail}");
    let failures: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|line| line.contains("FAIL: "))
        .collect();
    assert_eq!(
        failed,
        0,
        "{failed} {check_name}s failed:\n{}\nlog tail:\n{tail}",
        failures.join("\n")
    );
    assert!(
        output.status.success(),
        "script exit status {}; log tail:\n{tail}",
        output.status
    );
    stdout
}
