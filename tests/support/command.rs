//! Running external tools from tests, with the command line and its output in
//! every failure message.

use std::process::{Command, Output};

/// Formats a command as a shell-like line for messages.
pub fn describe(command: &Command) -> String {
    let mut line = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs a command to completion and returns its output, or an error message
/// with the command line, exit status, stdout and stderr when it cannot start
/// or exits non-zero.
pub fn try_run(command: &mut Command) -> Result<Output, String> {
    let line = describe(command);
    let output = command
        .output()
        .map_err(|error| format!("`{line}` could not start: {error}"))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(format!(
            "`{line}` failed with {}\nstdout:\n{}\nstderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Runs a command to completion and returns its output. Panics with the
/// command line and its output when it cannot start or exits non-zero.
pub fn run(command: &mut Command) -> Output {
    match try_run(command) {
        Ok(output) => output,
        Err(message) => panic!("{message}"),
    }
}

/// Returns stdout of a successful run as a trimmed string.
pub fn run_stdout(command: &mut Command) -> String {
    let output = run(command);
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}
