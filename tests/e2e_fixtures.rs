//! End-to-end checks on every reference fixture, the real Debian image and
//! the sample image: `esgz-nbd export` and `esgz-nbd serve` must give an ext4
//! filesystem that `e2fsck -fn` accepts and that the kernel mounts with
//! exactly the `merged_tree` of the fixture's sidecar.
//!
//! Needs root, loop devices, FUSE, e2fsprogs and libnbd-bin.

#[path = "support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{
    assert_tree_matches, e2fsck_clean, esgz_bin, run, run_stdout, shared_dir, LoopMount, NbdMount,
    Server,
};

/// An image under test: its OCI layout argument and its sidecar.
struct Case {
    image: String,
    expected: PathBuf,
}

fn case(name: &str) -> Case {
    let (dir, expected) = match name {
        "sample" => (support::sample_oci_dir(), support::sample_expected_json()),
        "debian" => {
            let dir = shared_dir().join("images/debian-bookworm-minbase");
            (dir.join("oci"), dir.join("expected.json"))
        }
        fixture => {
            let dir = support::fixture_dir(fixture);
            (dir.join("oci"), dir.join("expected.json"))
        }
    };
    assert!(dir.is_dir(), "OCI layout {} not found", dir.display());
    Case {
        image: format!("oci:{}:latest", dir.display()),
        expected,
    }
}

fn export(image: &str, dir: &Path) -> PathBuf {
    let output = dir.join("disk.img");
    run(Command::new(esgz_bin())
        .arg("export")
        .arg(image)
        .arg("-o")
        .arg(&output)
        .arg("--cache-dir")
        .arg(dir.join("cache")));
    output
}

fn check_export(name: &str) {
    let case = case(name);
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = export(&case.image, dir.path());
    e2fsck_clean(&disk);
    let mount = LoopMount::new(&disk);
    assert_tree_matches(mount.path(), &case.expected);
}

/// Serves the image, mounts it through nbdfuse and a loop device, compares the
/// tree, then copies the whole export with nbdcopy and compares it with
/// `esgz-nbd export` byte for byte.
fn check_serve(name: &str) {
    let case = case(name);
    let server = Server::start(&case.image, &[]);
    {
        let mount = NbdMount::new(server.socket());
        assert_tree_matches(mount.path(), &case.expected);
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let copied = dir.path().join("copied.img");
    run(Command::new("nbdcopy").arg(server.uri()).arg(&copied));
    let exported = export(&case.image, dir.path());
    let same = Command::new("cmp")
        .arg(&copied)
        .arg(&exported)
        .status()
        .expect("running cmp");
    assert!(
        same.success(),
        "nbdcopy of the served export differs from esgz-nbd export for {name}"
    );
    e2fsck_clean(&copied);
}

macro_rules! image_tests {
    ($($name:ident => $image:literal,)*) => {
        mod export {
            $(#[test] fn $name() { super::check_export($image); })*
        }
        mod serve {
            $(#[test] fn $name() { super::check_serve($image); })*
        }
    };
}

image_tests! {
    basic => "basic",
    links => "links",
    xattrs => "xattrs",
    large => "large",
    multilayer => "multilayer",
    debian => "debian",
    sample => "sample",
}

#[test]
fn qemu_img_and_nbdinfo_see_the_export() {
    let case = case("basic");
    let server = Server::start(&case.image, &["--export-name", "basic"]);

    let info = run_stdout(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(format!(
                "nbd+unix:///basic?socket={}",
                server.socket().display()
            )),
    );
    let info: serde_json::Value = serde_json::from_str(&info).expect("qemu-img prints JSON");
    let size = info["virtual-size"].as_u64().expect("virtual-size");
    assert!(size > 0 && size % 4096 == 0, "virtual-size {size}");
    assert_eq!(info["format"], "raw");

    let list = run_stdout(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(format!("nbd+unix://?socket={}", server.socket().display())),
    );
    assert!(
        list.contains("export=\"basic\""),
        "nbdinfo --list output:\n{list}"
    );
    assert!(
        list.contains(&size.to_string()),
        "nbdinfo --list output:\n{list}"
    );
}
