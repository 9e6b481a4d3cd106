//! A real Debian root filesystem made by `debootstrap --variant=minbase`,
//! built into an eStargz image with `esgz-nbd build`, pushed to a local
//! docker-registry, served lazily from it and mounted through nbdfuse and a
//! loop device: the mounted tree must equal the directory.
//!
//! Needs root, debootstrap and network access to deb.debian.org on the
//! first run (the root filesystem is then kept as a tarball under target/),
//! docker-registry, nbdfuse, e2fsprogs, setfattr, and Go with Debian's
//! stargz-snapshotter library package for the reference checker.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::{e2fsck_clean, esgz_bin, run, try_run, verify_layout, NbdMount, Registry, Server};

const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";

/// `security.capability` of `setcap cap_net_raw+ep`: a version 2
/// `vfs_cap_data` (magic 0x02000000 with the effective flag, then permitted
/// and inheritable words, little-endian) with bit 13 (CAP_NET_RAW) permitted.
const CAP_NET_RAW_EP: &str = "0x0100000200200000000000000000000000000000";

/// File that gets `CAP_NET_RAW_EP` when no file of the rootfs has a capability.
const CAPABILITY_FILE: &str = "usr/bin/env";

/// Returns the cached tarball of the root filesystem for `SUITE`.
fn cached_tarball() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(format!("debootstrap-{SUITE}-minbase.tar"))
}

/// Tar options that keep what the comparison checks: numeric owners,
/// permissions, xattrs (security.capability included), hard links and
/// device nodes.
const TAR_OPTIONS: [&str; 4] = [
    "--numeric-owner",
    "--xattrs",
    "--xattrs-include=*",
    "--same-permissions",
];

/// Fills `root` with a minbase root filesystem: from the cached tarball,
/// or by running debootstrap and caching the result.
fn make_rootfs(root: &Path) {
    let tarball = cached_tarball();
    if tarball.is_file() {
        run(Command::new("tar")
            .args(TAR_OPTIONS)
            .arg("-xf")
            .arg(&tarball)
            .arg("-C")
            .arg(root));
        return;
    }

    let mut command = Command::new("debootstrap");
    command
        .arg("--variant=minbase")
        .arg(SUITE)
        .arg(root)
        .arg(MIRROR);
    if let Err(message) = try_run(&mut command) {
        let log = fs::read_to_string(root.join("debootstrap/debootstrap.log"))
            .unwrap_or_else(|error| format!("(no debootstrap.log: {error})"));
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "debootstrap of {SUITE} from {MIRROR} failed (is debootstrap installed, and is the mirror reachable?): {message}\nend of debootstrap.log:\n{}",
            tail.join("\n")
        );
    }

    let staging = tarball.with_extension("tar.partial");
    run(Command::new("tar")
        .args(TAR_OPTIONS)
        .arg("-cf")
        .arg(&staging)
        .arg("-C")
        .arg(root)
        .arg("."));
    fs::rename(&staging, &tarball).unwrap_or_else(|error| {
        panic!(
            "renaming {} to {}: {error}",
            staging.display(),
            tarball.display()
        )
    });
}

/// Returns whether any file below `root` has a `security.capability` xattr.
fn has_capability(root: &Path) -> bool {
    let output = run(Command::new("getfattr")
        .args([
            "-R",
            "-P",
            "-m",
            "^security\\.capability$",
            "--absolute-names",
        ])
        .arg(root));
    !output.stdout.is_empty()
}

/// Groups the paths of hard-linked regular files by inode: each group
/// lists the paths (relative to `root`) that share one inode.
fn hard_link_groups(root: &Path) -> Vec<Vec<String>> {
    let mut by_inode: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries =
            fs::read_dir(&dir).unwrap_or_else(|error| panic!("listing {}: {error}", dir.display()));
        for entry in entries {
            let entry = entry.expect("directory entry");
            let metadata = entry.metadata().expect("lstat");
            if metadata.is_dir() {
                pending.push(entry.path());
            } else if metadata.is_file() && metadata.nlink() > 1 {
                let relative = entry
                    .path()
                    .strip_prefix(root)
                    .expect("below the root")
                    .display()
                    .to_string();
                by_inode.entry(metadata.ino()).or_default().push(relative);
            }
        }
    }
    let mut groups: Vec<Vec<String>> = by_inode
        .into_values()
        .map(|mut paths| {
            paths.sort();
            paths
        })
        .collect();
    groups.sort();
    groups
}

fn esgz(args: &[&str]) -> String {
    let output = run(Command::new(esgz_bin()).arg("-q").args(args));
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[test]
fn debootstrap_rootfs_round_trip() {
    let work = tempfile::tempdir().expect("temp dir");
    let root = work.path().join("rootfs");
    fs::create_dir(&root).expect("create the rootfs folder");
    make_rootfs(&root);
    assert!(
        root.join("usr/bin/dpkg").is_file(),
        "the root filesystem has no usr/bin/dpkg"
    );
    if !has_capability(&root) {
        run(Command::new("setfattr")
            .args(["-n", "security.capability", "-v", CAP_NET_RAW_EP])
            .arg(root.join(CAPABILITY_FILE)));
    }
    assert!(
        has_capability(&root),
        "no file has security.capability after setfattr"
    );

    // The expected tree, taken before anything reads the directory again.
    let manifest = work.path().join("rootfs.manifest");
    let listing = run(Command::new(esgz_bin()).arg("tree-manifest").arg(&root));
    fs::write(&manifest, &listing.stdout).expect("write the manifest");
    let links = hard_link_groups(&root);
    let devices = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter(|line| line.contains("\tchar\t") || line.contains("\tblock\t"))
        .count();

    let registry = Registry::start(None);
    let remote = format!("{}/debian/rootfs:{SUITE}", registry.addr());
    esgz(&[
        "build",
        root.to_str().expect("utf-8 path"),
        &remote,
        "--compression-level",
        "6",
    ]);

    // The reference reader checks every chunk of the pushed layer, copied
    // unchanged into a layout.
    let layout = work.path().join("layout");
    esgz(&[
        "convert",
        &remote,
        &format!("oci:{}:latest", layout.display()),
    ]);
    let layers = verify_layout(&layout, "latest");
    assert_eq!(layers.len(), 1, "layers: {layers:?}");
    assert_eq!(layers[0]["status"], "passed", "{}", layers[0]);

    let server = Server::start(&remote, &["--no-prefetch"]);
    let mount = NbdMount::new(server.socket());
    let check = Command::new(esgz_bin())
        .arg("tree-manifest")
        .arg(mount.path())
        .arg("--check")
        .arg(&manifest)
        .args(["--ignore", "/lost+found"])
        .output()
        .expect("esgz-nbd tree-manifest runs");
    assert!(
        check.status.success(),
        "the mounted tree differs from the root filesystem:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert_eq!(
        hard_link_groups(mount.path()),
        links,
        "hard link groups of the mount and the directory"
    );
    // The comparison covers hard links, device nodes and capabilities
    // only if the root filesystem has them.
    assert!(!links.is_empty(), "the root filesystem has no hard links");
    assert!(devices > 0, "the root filesystem has no device nodes");
    assert!(
        has_capability(mount.path()),
        "no file of the mount has security.capability"
    );
    eprintln!(
        "rootfs: {} hard link groups, {devices} device nodes",
        links.len()
    );

    e2fsck_clean(&mount.device_file());
    drop(mount);
    let (_, log) = server.stop();
    assert!(!log.contains(" ERROR "), "the server logged errors:\n{log}");
}
