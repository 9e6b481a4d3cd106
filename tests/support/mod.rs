//! Shared helpers for integration tests: fixture paths, a local OCI registry,
//! tree comparison against fixture sidecars, and NBD and loop mounts.
//!
//! Include it from a test file with
//! `#[path = "support/mod.rs"] mod support;`.
//! The mount helpers need root (losetup, mount) and the tools that
//! `scripts/install-deps.sh` installs.

// Each test binary uses only some of these helpers.
#![allow(dead_code, unused_imports)]

mod command;
mod fault_proxy;
mod layout;
mod mount;
mod plain;
mod reference;
mod registry;
mod server;
mod tree;
mod vm;

use std::path::{Path, PathBuf};

pub use command::{run, run_stdout, try_run};
pub use fault_proxy::{Fault, FaultProxy, Plan, RequestInfo};
pub use layout::{
    blob_path, copy_layout, edit_manifest, footer, footer_toc_offset, gzip, layer_descriptor,
    layer_digest, member_range, patch_layer_blob, read_layer_blob, read_manifest, read_toc,
    registry_blob_data, replace_layer_blob, replace_toc_member, rewrite_toc, set_footer_toc_offset,
    set_toc_digest_annotation, sha256_digest, toc_entries, toc_member, two_platform_layout,
    write_blob, FOOTER_SIZE, TOC_DIGEST_ANNOTATION, TOC_TAR_NAME, UNCOMPRESSED_SIZE_ANNOTATION,
};
pub use mount::{e2fsck_clean, LoopMount, NbdMount};
pub use plain::{
    gzip_layer, plain_gzip_image, plain_tar_layer, write_layout, ImageLayer, GZIP_LAYER, TAR_LAYER,
};
pub use reference::{estargz_ref, verify_layout};
pub use registry::{
    port_is_open, push_layout_unchanged, skopeo_manifest_digest, skopeo_push, write_docker_config,
    Registry,
};
pub use server::Server;
pub use tree::{assert_tree_matches, compare_tree};
pub use vm::{parse_summary, run_vm_script};

/// Returns the shared folder with fixtures, images and tools.
///
/// The folder is `$ESGZ_SHARED` if set, else `../shared` next to the crate,
/// else `/work/shared`. Panics, naming every path tried, when none exists.
pub fn shared_dir() -> PathBuf {
    let mut tried = Vec::new();
    if let Some(dir) = std::env::var_os("ESGZ_SHARED") {
        let dir = PathBuf::from(dir);
        if dir.is_dir() {
            return dir;
        }
        // An explicit setting that points nowhere is a mistake, not a cue to
        // fall back to another folder.
        panic!(
            "ESGZ_SHARED is {} but that folder does not exist; point it at the shared folder with fixtures/ and scripts/",
            dir.display()
        );
    }
    let candidates = [
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"),
        PathBuf::from("/work/shared"),
    ];
    for dir in candidates {
        if dir.is_dir() {
            return dir;
        }
        tried.push(dir.display().to_string());
    }
    panic!(
        "shared folder not found (tried {}); set ESGZ_SHARED to the folder with fixtures/ and scripts/",
        tried.join(", ")
    );
}

/// Returns the folder of one fixture, such as `fixture_dir("links")`.
pub fn fixture_dir(name: &str) -> PathBuf {
    let dir = shared_dir().join("fixtures").join(name);
    assert!(dir.is_dir(), "fixture folder {} not found", dir.display());
    dir
}

/// Returns the path of the `esgz-nbd` binary that Cargo built for this test.
pub fn esgz_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_esgz-nbd"))
}

/// Returns the sample image layout shipped in `examples/sample-oci`.
pub fn sample_oci_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sample-oci")
}

/// Returns the sidecar JSON that describes the sample image's tree.
pub fn sample_expected_json() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sample-oci.expected.json")
}
