//! The chunk cache falls back to pread/pwrite when io_uring is blocked, as it
//! is under a seccomp profile that denies `io_uring_setup` (the default of
//! several container runtimes). The test installs such a filter in the child
//! process before it starts `esgz-nbd export`, so the product meets the real
//! kernel error, not a simulated one.

#[path = "support/mod.rs"]
mod support;

use std::os::unix::process::CommandExt;
use std::process::Command;

use support::{assert_tree_matches, e2fsck_clean, esgz_bin, fixture_dir, LoopMount};

/// `io_uring_setup` on x86_64 and aarch64 (the number is the same on both).
const SYS_IO_URING_SETUP: u32 = 425;

/// Installs a seccomp filter that makes `io_uring_setup` fail with EPERM and
/// allows every other system call.
fn deny_io_uring_setup() -> std::io::Result<()> {
    // BPF program: load the syscall number (offset 0 of seccomp_data); if it
    // is io_uring_setup return ERRNO(EPERM), else ALLOW.
    let filter = [
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: SYS_IO_URING_SETUP,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `program` points at `filter`, which outlives the call; the
    // kernel copies the program before prctl returns.
    let result = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &program as *const libc::sock_fprog,
        )
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn export_command(dir: &std::path::Path, io: &str) -> Command {
    let fixture = fixture_dir("basic");
    let mut command = Command::new(esgz_bin());
    command
        .arg("export")
        .arg(format!("oci:{}:latest", fixture.join("oci").display()))
        .arg("-o")
        .arg(dir.join("disk.img"))
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .arg("--io")
        .arg(io);
    command
}

#[test]
fn auto_io_falls_back_under_seccomp() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut command = export_command(dir.path(), "auto");
    // SAFETY: the closure only calls prctl, which is async-signal-safe.
    unsafe {
        command.pre_exec(deny_io_uring_setup);
    }
    let output = command.output().expect("starting esgz-nbd export");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "export failed; stderr:\n{stderr}");
    let fallback_lines = stderr
        .lines()
        .filter(|line| line.contains("io_uring is unavailable"))
        .count();
    assert_eq!(
        fallback_lines, 1,
        "the fallback should be logged exactly once; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("pread/pwrite"),
        "the log should name the fallback backend; stderr:\n{stderr}"
    );

    let disk = dir.path().join("disk.img");
    e2fsck_clean(&disk);
    let mount = LoopMount::new(&disk);
    assert_tree_matches(mount.path(), &fixture_dir("basic").join("expected.json"));
}

#[test]
fn forced_io_uring_fails_under_seccomp() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut command = export_command(dir.path(), "io-uring");
    // SAFETY: the closure only calls prctl, which is async-signal-safe.
    unsafe {
        command.pre_exec(deny_io_uring_setup);
    }
    let output = command.output().expect("starting esgz-nbd export");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "--io io-uring should fail when io_uring is blocked; stderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "export panicked:\n{stderr}");
    assert!(
        stderr.contains("io_uring"),
        "the error should name io_uring; stderr:\n{stderr}"
    );
}

#[test]
fn auto_io_uses_io_uring_when_allowed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = export_command(dir.path(), "auto")
        .output()
        .expect("starting esgz-nbd export");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "export failed; stderr:\n{stderr}");
    assert!(
        stderr.contains("io=\"io_uring\""),
        "without a filter the cache should use io_uring; stderr:\n{stderr}"
    );
}
