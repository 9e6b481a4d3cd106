//! Running the attach server in the background: the command re-executes
//! itself in a new session with `--foreground` and waits on a readiness pipe
//! for the device path or an error message.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::state::RuntimeDir;
use super::AttachError;

/// Descriptor number of the readiness pipe in the background server.
pub const READY_FD: RawFd = 3;

/// Message of the background server on the readiness pipe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// The device path and the milliseconds from start to the first read.
    Ready {
        device: String,
        attach_ms: u64,
    },
    Failed {
        message: String,
    },
}

impl Readiness {
    fn to_line(&self) -> String {
        match self {
            Readiness::Ready { device, attach_ms } => format!("ok {device} {attach_ms}\n"),
            // One line: the message may not contain newlines.
            Readiness::Failed { message } => format!("err {}\n", message.replace('\n', " ")),
        }
    }

    fn parse(line: &str) -> Option<Readiness> {
        let line = line.trim_end_matches('\n');
        if let Some(message) = line.strip_prefix("err ") {
            return Some(Readiness::Failed {
                message: message.to_string(),
            });
        }
        let rest = line.strip_prefix("ok ")?;
        let (device, attach_ms) = rest.rsplit_once(' ')?;
        Some(Readiness::Ready {
            device: device.to_string(),
            attach_ms: attach_ms.parse().ok()?,
        })
    }
}

/// The server's end of the readiness pipe.
pub struct ReadyPipe(File);

impl ReadyPipe {
    /// Takes ownership of descriptor `fd`, checking that it is open.
    pub fn from_fd(fd: RawFd) -> Result<ReadyPipe, AttachError> {
        // SAFETY: F_GETFD takes no pointer and only reports whether fd is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(AttachError::Io {
                step: "use the readiness descriptor",
                path: PathBuf::from(format!("/proc/self/fd/{fd}")),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: fd is open (checked above) and the parent passed it for this
        // process alone, so nothing else in this process owns it.
        Ok(ReadyPipe(unsafe { File::from_raw_fd(fd) }))
    }

    /// Reports the outcome and closes the pipe, which ends the parent's wait.
    pub fn report(mut self, readiness: &Readiness) {
        let _ = self.0.write_all(readiness.to_line().as_bytes());
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), AttachError> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is a writable array of two descriptors, as pipe2 requires.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(AttachError::Io {
            step: "create the readiness pipe",
            path: PathBuf::from("pipe"),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and not owned elsewhere.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Inserts the server-mode flags into `args` (the arguments after the program
/// name), before a `--` separator if there is one.
pub fn server_args(args: &[OsString], log_file: &Path) -> Vec<OsString> {
    let extra: [OsString; 5] = [
        "--foreground".into(),
        "--ready-fd".into(),
        READY_FD.to_string().into(),
        "--log-file".into(),
        log_file.as_os_str().to_owned(),
    ];
    let split = args
        .iter()
        .position(|arg| arg == "--")
        .unwrap_or(args.len());
    let mut out = args[..split].to_vec();
    out.extend(extra);
    out.extend_from_slice(&args[split..]);
    out
}

/// Starts the server in the background and waits until it reports the device
/// readable (or fails). Returns the device path and the attach time in ms.
pub fn spawn_background(
    runtime: &RuntimeDir,
    args: &[OsString],
) -> Result<(String, u64), AttachError> {
    runtime.create().map_err(|source| AttachError::Io {
        step: "create the runtime directory",
        path: runtime.dir.clone(),
        source,
    })?;
    let log_path = runtime
        .dir
        .join(format!("attach-{}.log", std::process::id()));
    let log = File::create(&log_path).map_err(|source| AttachError::Io {
        step: "create the server log",
        path: log_path.clone(),
        source,
    })?;
    let exe = std::env::current_exe().map_err(|source| AttachError::Io {
        step: "find the executable",
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;

    let (read_end, write_end) = pipe()?;
    let write_fd = write_end.as_raw_fd();
    let mut command = Command::new(exe);
    command
        .args(server_args(args, &log_path))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    // SAFETY: the closure runs in the forked child before exec and calls only
    // dup2 and setsid, which are async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(write_fd, READY_FD) < 0 || libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| AttachError::Io {
        step: "start the background server",
        path: log_path.clone(),
        source,
    })?;
    drop(write_end);

    let mut line = String::new();
    let mut reader = BufReader::new(File::from(read_end));
    let _ = reader.read_line(&mut line);
    match Readiness::parse(&line) {
        Some(Readiness::Ready { device, attach_ms }) => Ok((device, attach_ms)),
        Some(Readiness::Failed { message }) => {
            let _ = child.wait();
            let _ = std::fs::remove_file(&log_path);
            Err(AttachError::Background { message })
        }
        None => {
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            Err(AttachError::Background {
                message: format!(
                    "it exited ({status}) without reporting; log {}: {}",
                    log_path.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_lines_round_trip() {
        let cases = [
            Readiness::Ready {
                device: "/dev/nbd3".into(),
                attach_ms: 812,
            },
            Readiness::Failed {
                message: "image not found".into(),
            },
        ];
        for case in cases {
            assert_eq!(Readiness::parse(&case.to_line()), Some(case));
        }
        assert_eq!(Readiness::parse(""), None);
        assert_eq!(Readiness::parse("ok /dev/nbd0 x\n"), None);
    }

    #[test]
    fn multi_line_error_stays_one_line() {
        let line = Readiness::Failed {
            message: "a\nb".into(),
        }
        .to_line();
        assert_eq!(line, "err a b\n");
    }

    #[test]
    fn server_flags_go_before_separator() {
        let args: Vec<OsString> = ["attach", "oci:/x", "--", "/dev/nbd0"]
            .iter()
            .map(OsString::from)
            .collect();
        let out = server_args(&args, Path::new("/run/l.log"));
        let out: Vec<&str> = out.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            out,
            [
                "attach",
                "oci:/x",
                "--foreground",
                "--ready-fd",
                "3",
                "--log-file",
                "/run/l.log",
                "--",
                "/dev/nbd0"
            ]
        );
    }
}
