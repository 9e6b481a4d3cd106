//! The reference eStargz checker (`estargz-ref`), built from Debian's
//! packaged stargz-snapshotter library by the shared build script.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

use super::command::run;
use super::shared_dir;

/// Builds the reference checker into `target/estargz-ref` once per test
/// binary (a later binary reuses the file) and returns its path.
pub fn estargz_ref() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let output = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/estargz-ref");
        if !output.is_file() {
            run(Command::new(shared_dir().join("tools/estargz-ref/build.sh")).arg(&output));
        }
        output
    })
}

/// Runs `estargz-ref verify -require-all` on the image `tag` of an OCI
/// layout and returns its per-layer JSON lines; panics with the output when
/// a layer fails.
pub fn verify_layout(dir: &Path, tag: &str) -> Vec<Value> {
    let output = Command::new(estargz_ref())
        .arg("verify")
        .arg("-oci")
        .arg(format!("{}:{tag}", dir.display()))
        .arg("-require-all")
        .output()
        .unwrap_or_else(|error| panic!("{} could not start: {error}", estargz_ref().display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "estargz-ref verify failed for {}:{tag}\nstdout:\n{stdout}\nstderr:\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).expect("verify prints JSON lines"))
        .collect()
}
