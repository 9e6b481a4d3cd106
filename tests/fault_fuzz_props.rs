//! Stable-toolchain counterparts of the cargo-fuzz targets: each harness in
//! `fuzz/src/lib.rs` runs on the fixture seeds, on mutations of them and on
//! random bytes, and random small trees written as TOCs become ext4 images
//! that `e2fsck -fn` must find clean.
//!
//! Needs e2fsprogs for the e2fsck property.

#[path = "../fuzz/src/lib.rs"]
mod harness;
#[path = "support/mod.rs"]
mod support;

use std::fs;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use esgz_nbd::estargz::build_index;
use esgz_nbd::ext4::{Layout, LayoutOptions, SegmentKind, BLOCK_SIZE};
use esgz_nbd::tree::merge::merge;
use proptest::prelude::*;
use serde_json::{json, Value};

use support::{e2fsck_clean, shared_dir};

/// Inputs tried per harness and strategy; each proptest case is one input.
const CASES: u32 = 64;

/// Seed inputs of one harness, read from the fixtures.
#[derive(Default)]
struct Seeds {
    footer: Vec<Vec<u8>>,
    toc: Vec<Vec<u8>>,
    tar: Vec<Vec<u8>>,
    manifest: Vec<Vec<u8>>,
    nbd: Vec<Vec<u8>>,
}

fn fixture_dirs() -> Vec<PathBuf> {
    let root = shared_dir().join("fixtures");
    let mut dirs: Vec<PathBuf> = fs::read_dir(&root)
        .expect("listing the fixtures")
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// Reads the seeds once: blob footers with their blob size, TOC JSON with a
/// large TOC offset, input tars under 1 MiB, OCI JSON documents, and an NBD
/// client transcript.
fn seeds() -> &'static Seeds {
    static SEEDS: OnceLock<Seeds> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut seeds = Seeds::default();
        for dir in fixture_dirs() {
            for entry in fs::read_dir(&dir).expect("listing a fixture") {
                let path = entry.expect("a fixture entry").path();
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                if name.ends_with(".toc.json") {
                    let mut input = (1u64 << 40).to_le_bytes().to_vec();
                    input.extend(fs::read(&path).expect("reading a TOC"));
                    seeds.toc.push(input);
                } else if name.ends_with(".tar")
                    && fs::metadata(&path).map(|m| m.len()).unwrap_or(u64::MAX) < 1 << 20
                {
                    seeds.tar.push(fs::read(&path).expect("reading a tar"));
                }
            }
            let oci = dir.join("oci");
            if let Ok(index) = fs::read(oci.join("index.json")) {
                seeds.manifest.push(index);
            }
            for entry in fs::read_dir(oci.join("blobs/sha256")).into_iter().flatten() {
                let path = entry.expect("a blob entry").path();
                let bytes = fs::read(&path).expect("reading a blob");
                if bytes.first() == Some(&b'{') {
                    seeds.manifest.push(bytes);
                } else if bytes.len() >= 51 {
                    let mut input = (bytes.len() as u64).to_le_bytes().to_vec();
                    input.extend_from_slice(&bytes[bytes.len() - 51..]);
                    seeds.footer.push(input);
                }
            }
        }
        seeds.nbd.push(nbd_transcript());
        for (what, list) in [
            ("footer", &seeds.footer),
            ("TOC", &seeds.toc),
            ("tar", &seeds.tar),
            ("manifest", &seeds.manifest),
        ] {
            assert!(!list.is_empty(), "no {what} seed in the fixtures");
        }
        seeds
    })
}

/// Returns a client session: flags, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_GO, reads
/// (one failing), NBD_CMD_CACHE, BLOCK_STATUS and NBD_CMD_DISC.
fn nbd_transcript() -> Vec<u8> {
    const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    const REQUEST_MAGIC: u32 = 0x2560_9513;
    let mut bytes = 3u32.to_be_bytes().to_vec();
    let mut option = |code: u32, data: &[u8]| {
        bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
        bytes.extend_from_slice(&code.to_be_bytes());
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(data);
    };
    option(8, &[]);
    option(7, &[0, 0, 0, 0, 0, 1, 0, 3]);
    let requests: [(u16, u64, u32); 6] = [
        (0, 0, 4096),
        (0, 600 << 10, 4096),
        (5, 0, 65536),
        (7, 0, 65536),
        (0, 1 << 20, 1),
        (2, 0, 0),
    ];
    for (cookie, (kind, offset, length)) in requests.into_iter().enumerate() {
        bytes.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        bytes.extend_from_slice(&0u16.to_be_bytes());
        bytes.extend_from_slice(&kind.to_be_bytes());
        bytes.extend_from_slice(&(cookie as u64).to_be_bytes());
        bytes.extend_from_slice(&offset.to_be_bytes());
        bytes.extend_from_slice(&length.to_be_bytes());
    }
    bytes
}

/// Returns a seed with up to 16 bytes overwritten and an optional truncation.
fn mutated(pick: fn(&'static Seeds) -> &'static [Vec<u8>]) -> impl Strategy<Value = Vec<u8>> {
    let list = pick(seeds());
    (
        0..list.len(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..16),
        prop::option::of(any::<prop::sample::Index>()),
    )
        .prop_map(move |(seed, edits, cut)| {
            let mut bytes = list[seed].clone();
            if bytes.is_empty() {
                return bytes;
            }
            for (at, value) in edits {
                let position = at.index(bytes.len());
                bytes[position] = value;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            bytes
        })
}

fn random_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..2048)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn footer_mutations(input in mutated(|s| &s.footer)) {
        harness::footer(&input);
    }

    #[test]
    fn footer_random(input in random_bytes()) {
        harness::footer(&input);
    }

    #[test]
    fn toc_index_mutations(input in mutated(|s| &s.toc)) {
        harness::toc_index(&input);
    }

    #[test]
    fn toc_index_random(input in random_bytes()) {
        harness::toc_index(&input);
    }

    #[test]
    fn tar_index_mutations(input in mutated(|s| &s.tar)) {
        harness::tar_index(&input);
    }

    #[test]
    fn tar_index_random(input in random_bytes()) {
        harness::tar_index(&input);
    }

    #[test]
    fn manifest_mutations(input in mutated(|s| &s.manifest)) {
        harness::manifest(&input);
    }

    #[test]
    fn manifest_random(input in random_bytes()) {
        harness::manifest(&input);
    }

    #[test]
    fn nbd_stream_mutations(input in mutated(|s| &s.nbd)) {
        harness::nbd_stream(&input);
    }

    #[test]
    fn nbd_stream_random(input in random_bytes()) {
        harness::nbd_stream(&input);
    }

    #[test]
    fn ext4_layout_mutations(input in mutated(|s| &s.toc)) {
        // The TOC seeds start with an 8-byte offset that this harness does not use.
        harness::ext4_layout(input.get(8..).unwrap_or_default());
    }
}

/// Every seed as it is, so a regression in a fixture-shaped input shows up
/// without proptest's randomness.
#[test]
fn harnesses_accept_seeds() {
    let seeds = seeds();
    for input in &seeds.footer {
        harness::footer(input);
    }
    for input in &seeds.toc {
        harness::toc_index(input);
        harness::ext4_layout(&input[8..]);
    }
    for input in &seeds.tar {
        harness::tar_index(input);
    }
    for input in &seeds.manifest {
        harness::manifest(input);
    }
    for input in &seeds.nbd {
        harness::nbd_stream(input);
    }
}

/// One node of a random tree.
#[derive(Clone, Debug)]
enum NodeSpec {
    Dir,
    File { size: u64 },
    Symlink { target_len: usize },
    HardLink { to: prop::sample::Index },
    Fifo,
    CharDevice,
}

#[derive(Clone, Debug)]
struct EntrySpec {
    node: NodeSpec,
    parent: prop::sample::Index,
    name_len: usize,
    mode: u32,
    uid: u32,
    xattrs: Vec<(u8, usize)>,
}

fn entry_spec() -> impl Strategy<Value = EntrySpec> {
    let node = prop_oneof![
        3 => Just(NodeSpec::Dir),
        5 => (0u64..300_000).prop_map(|size| NodeSpec::File { size }),
        2 => (1usize..300).prop_map(|target_len| NodeSpec::Symlink { target_len }),
        1 => any::<prop::sample::Index>().prop_map(|to| NodeSpec::HardLink { to }),
        1 => Just(NodeSpec::Fifo),
        1 => Just(NodeSpec::CharDevice),
    ];
    (
        node,
        any::<prop::sample::Index>(),
        1usize..250,
        0u32..0o7777,
        0u32..70_000,
        prop::collection::vec((0u8..4, 0usize..400), 0..3),
    )
        .prop_map(|(node, parent, name_len, mode, uid, xattrs)| EntrySpec {
            node,
            parent,
            name_len,
            mode,
            uid,
            xattrs,
        })
}

/// Writes a tree of specs as TOC JSON. Names are unique (an index suffix);
/// a regular file's gzip member offset grows with each file.
fn toc_json(specs: &[EntrySpec]) -> Vec<u8> {
    let mut dirs = vec![String::new()];
    let mut files: Vec<String> = Vec::new();
    let mut entries = vec![json!({"name": "./", "type": "dir", "mode": 0o755})];
    let mut offset = 100u64;
    for (index, spec) in specs.iter().enumerate() {
        let parent = dirs[spec.parent.index(dirs.len())].clone();
        let stem: String = "n".repeat(spec.name_len.min(240));
        let path = format!("{parent}{stem}{index}");
        let mut entry = json!({
            "name": path,
            "mode": spec.mode,
            "uid": spec.uid,
            "gid": spec.uid / 2,
            "modtime": "2023-11-14T22:13:20Z",
        });
        match &spec.node {
            NodeSpec::Dir => {
                entry["name"] = Value::from(format!("{path}/"));
                entry["type"] = "dir".into();
                dirs.push(format!("{path}/"));
            }
            NodeSpec::File { size } => {
                entry["type"] = "reg".into();
                entry["size"] = (*size).into();
                if *size > 0 {
                    entry["offset"] = offset.into();
                    offset += 100;
                }
                files.push(path.clone());
            }
            NodeSpec::Symlink { target_len } => {
                entry["type"] = "symlink".into();
                entry["linkName"] = "t".repeat(*target_len).into();
            }
            NodeSpec::HardLink { to } => {
                if files.is_empty() {
                    entry["type"] = "fifo".into();
                } else {
                    entry["type"] = "hardlink".into();
                    entry["linkName"] = files[to.index(files.len())].clone().into();
                }
            }
            NodeSpec::Fifo => entry["type"] = "fifo".into(),
            NodeSpec::CharDevice => {
                entry["type"] = "char".into();
                entry["devMajor"] = 1.into();
                entry["devMinor"] = 3.into();
            }
        }
        if !spec.xattrs.is_empty() {
            let mut xattrs = serde_json::Map::new();
            for (key, len) in &spec.xattrs {
                // TOC xattr values are base64; "QUJD" is "ABC".
                xattrs.insert(format!("user.k{key}"), "QUJD".repeat(len / 4 + 1).into());
            }
            entry["xattrs"] = Value::Object(xattrs);
        }
        entries.push(entry);
    }
    serde_json::to_vec(&json!({"version": 1, "entries": entries})).expect("encoding the TOC")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(50))]

    /// Random small trees, written as a TOC, indexed, merged and laid out as
    /// ext4: `e2fsck -fn` finds the image clean.
    #[test]
    fn random_trees_pass_e2fsck(specs in prop::collection::vec(entry_spec(), 0..40)) {
        let json = toc_json(&specs);
        let index = build_index(0, harness::DIGEST, &json, 1 << 40, &harness::small_limits())
            .map_err(|error| TestCaseError::fail(format!("build_index: {error}")))?;
        let tree = merge(&[index.entries])
            .map_err(|error| TestCaseError::fail(format!("merge: {error}")))?;
        let layout = Layout::new(Arc::new(tree), LayoutOptions::default())
            .map_err(|error| TestCaseError::fail(format!("layout: {error}")))?;

        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("image.ext4");
        let file = fs::File::create(&path).expect("creating the image");
        file.set_len(layout.size()).expect("sizing the image");
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        for segment in layout.segments(0, layout.block_count()) {
            if segment.kind != SegmentKind::Metadata {
                continue;
            }
            for number in segment.start_block..segment.start_block + segment.block_count {
                layout.render_metadata(number, &mut block);
                if block.iter().any(|&byte| byte != 0) {
                    file.write_all_at(&block, number * BLOCK_SIZE).expect("writing a block");
                }
            }
        }
        drop(file);
        e2fsck_clean(&path);
    }
}
