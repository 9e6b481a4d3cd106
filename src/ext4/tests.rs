//! End-to-end tests of the ext4 synthesizer against real readers: e2fsck, debugfs and the kernel's ext4 driver.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use super::*;
use crate::tree::{Children, FileData, Metadata, Node, NodeKind, Tree, ROOT};

const GIB: u64 = 1 << 30;
const BIG_FILE_SIZE: u64 = 6 * GIB;
/// Bytes written at the start and the end of files larger than this; the
/// rest of such files stays a hole (zeros) in the test image.
const SAMPLED_BYTES: u64 = 1 << 20;
const BIGDIR_ENTRIES: usize = 20000;
const BASE_TIME: i64 = 1_700_000_000;

fn meta(mode: u16) -> Metadata {
    Metadata {
        mode,
        uid: 0,
        gid: 0,
        mtime: BASE_TIME,
        mtime_nsec: 0,
        xattrs: Default::default(),
    }
}

/// Builds trees by hand; each layer's data offsets grow as files are added.
struct Builder {
    nodes: Vec<Node>,
    /// Children by directory, turned into each directory's [`Children`] in `build`,
    /// because `Children::insert` rebuilds the whole list.
    links: BTreeMap<NodeId, Vec<(Vec<u8>, NodeId)>>,
    layer_ends: [u64; 2],
}

impl Builder {
    fn new() -> Builder {
        let root = Node {
            kind: NodeKind::Dir {
                children: Children::new(),
            },
            meta: meta(0o755),
        };
        Builder {
            nodes: vec![root],
            links: BTreeMap::new(),
            layer_ends: [0; 2],
        }
    }

    fn link(&mut self, parent: NodeId, name: &str, node: NodeId) {
        assert!(
            matches!(self.nodes[parent as usize].kind, NodeKind::Dir { .. }),
            "parent {parent} is not a directory"
        );
        self.links
            .entry(parent)
            .or_default()
            .push((name.as_bytes().to_vec(), node));
    }

    fn add(&mut self, parent: NodeId, name: &str, kind: NodeKind, meta: Metadata) -> NodeId {
        let id = self.nodes.len() as NodeId;
        self.nodes.push(Node { kind, meta });
        self.link(parent, name, id);
        id
    }

    fn dir(&mut self, parent: NodeId, name: &str) -> NodeId {
        self.add(
            parent,
            name,
            NodeKind::Dir {
                children: Children::new(),
            },
            meta(0o755),
        )
    }

    fn file(
        &mut self,
        parent: NodeId,
        name: &str,
        layer: u32,
        size: u64,
        meta: Metadata,
    ) -> NodeId {
        let data_offset = self.layer_ends[layer as usize];
        self.layer_ends[layer as usize] += size;
        self.add(
            parent,
            name,
            NodeKind::Reg {
                data: FileData {
                    layer,
                    data_offset,
                    size,
                },
            },
            meta,
        )
    }

    fn build(mut self) -> Arc<Tree> {
        for (dir, pairs) in std::mem::take(&mut self.links) {
            if let NodeKind::Dir { children } = &mut self.nodes[dir as usize].kind {
                // Later links of a name replace earlier ones, as `insert` does.
                let mut all: Vec<(Vec<u8>, NodeId)> = children
                    .iter()
                    .map(|(name, node)| (name.to_vec(), node))
                    .collect();
                all.extend(pairs);
                *children = all.into_iter().collect();
            }
        }
        Arc::new(Tree { nodes: self.nodes })
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Deterministic content of file `node` at `offset`.
fn fill_file_bytes(node: NodeId, offset: u64, out: &mut [u8]) {
    for (i, byte) in out.iter_mut().enumerate() {
        let position = offset + i as u64;
        let word = splitmix64((u64::from(node) << 40) ^ (position / 8));
        *byte = (word >> (8 * (position % 8))) as u8;
    }
}

fn file_size(tree: &Tree, node: NodeId) -> u64 {
    match tree.node(node).kind {
        NodeKind::Reg { data } => data.size,
        _ => panic!("node {node} is not a regular file"),
    }
}

/// Writes the whole image: metadata rendered, file data from
/// `fill_file_bytes` (only the sampled head and tail of large files), zeros
/// elsewhere (left as holes).
fn write_image(layout: &Layout, tree: &Tree, path: &Path) {
    let file = File::create(path).expect("create image file");
    file.set_len(layout.size()).expect("size image file");
    let mut block = vec![0u8; BLOCK_SIZE as usize];
    for segment in layout.segments(0, layout.block_count()) {
        match segment.kind {
            SegmentKind::Metadata => {
                for b in segment.start_block..segment.start_block + segment.block_count {
                    layout.render_metadata(b, &mut block);
                    if block.iter().any(|&byte| byte != 0) {
                        file.write_all_at(&block, b * BLOCK_SIZE)
                            .expect("write metadata block");
                    }
                }
            }
            SegmentKind::File { node, file_offset } => {
                let size = file_size(tree, node);
                for i in 0..segment.block_count {
                    let offset = file_offset + i * BLOCK_SIZE;
                    let sampled = size <= 2 * SAMPLED_BYTES
                        || offset < SAMPLED_BYTES
                        || offset + SAMPLED_BYTES >= size;
                    if !sampled {
                        continue;
                    }
                    let len = (size - offset).min(BLOCK_SIZE) as usize;
                    fill_file_bytes(node, offset, &mut block[..len]);
                    file.write_all_at(&block[..len], (segment.start_block + i) * BLOCK_SIZE)
                        .expect("write data");
                }
            }
            SegmentKind::Zero => {}
        }
    }
}

/// Runs a tool; a missing tool fails the test with its name.
fn run(tool: &str, args: &[&str]) -> (i32, String, String) {
    let output = match Command::new(tool).args(args).output() {
        Ok(output) => output,
        Err(err) if err.kind() == ErrorKind::NotFound => {
            panic!("{tool} not found: install it (e2fsprogs for e2fsck/debugfs, attr for getfattr, mount/util-linux)")
        }
        Err(err) => panic!("running {tool} failed: {err}"),
    };
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn e2fsck_clean(image: &Path) {
    let (code, stdout, stderr) = run("e2fsck", &["-fn", image.to_str().unwrap()]);
    let unexpected: Vec<&str> = stdout
        .lines()
        .filter(|line| {
            !line.starts_with("Pass ") && !line.contains(" files (") && !line.trim().is_empty()
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "e2fsck reported problems:\n{stdout}\n{stderr}"
    );
    assert_eq!(code, 0, "e2fsck exit code, output:\n{stdout}\n{stderr}");
    eprintln!("e2fsck: {}", stdout.lines().last().unwrap_or(""));
}

fn debugfs(image: &Path, request: &str) -> String {
    let (code, stdout, stderr) = run("debugfs", &["-R", request, image.to_str().unwrap()]);
    assert_eq!(code, 0, "debugfs -R '{request}' failed: {stderr}");
    stdout
}

/// Unmounts on drop, so a failing assertion leaves no mount behind.
struct MountGuard {
    dir: PathBuf,
}

impl MountGuard {
    fn mount(image: &Path, dir: &Path) -> MountGuard {
        let (code, _, stderr) = run(
            "mount",
            &[
                "-t",
                "ext4",
                "-o",
                "loop,ro",
                image.to_str().unwrap(),
                dir.to_str().unwrap(),
            ],
        );
        assert_eq!(
            code, 0,
            "mount -o loop,ro failed (the test needs root and loop devices): {stderr}"
        );
        MountGuard {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        let (code, _, stderr) = run("umount", &[self.dir.to_str().unwrap()]);
        if code != 0 {
            eprintln!("umount {} failed: {stderr}", self.dir.display());
        }
    }
}

fn getfattr(path: &Path, name: &str) -> Vec<u8> {
    let output = match Command::new("getfattr")
        .args(["--only-values", "-h", "-n", name])
        .arg(path)
        .output()
    {
        Ok(output) => output,
        Err(err) if err.kind() == ErrorKind::NotFound => {
            panic!("getfattr not found: apt-get install -y attr")
        }
        Err(err) => panic!("running getfattr failed: {err}"),
    };
    assert!(
        output.status.success(),
        "getfattr -n {name} {}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

fn device_numbers(rdev: u64) -> (u64, u64) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major, minor)
}

fn capability_v2() -> Vec<u8> {
    // VFS_CAP_REVISION_2 | effective, permitted = CAP_NET_RAW (bit 13).
    let mut value = 0x0200_0001u32.to_le_bytes().to_vec();
    for word in [1u32 << 13, 0, 0, 0] {
        value.extend_from_slice(&word.to_le_bytes());
    }
    value
}

fn posix_acl() -> Vec<u8> {
    let mut value = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (1u16, 6u16, u32::MAX),
        (2, 4, 1000),
        (4, 4, u32::MAX),
        (0x10, 6, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        value.extend_from_slice(&tag.to_le_bytes());
        value.extend_from_slice(&perm.to_le_bytes());
        value.extend_from_slice(&id.to_le_bytes());
    }
    value
}

fn bigdir_name(i: usize) -> String {
    // Long names push the directory past 508 leaves: two htree levels.
    format!("entry-{i:05}-{}", "n".repeat(140))
}

/// Node ids of interesting entries of the sample tree.
struct Sample {
    tree: Arc<Tree>,
    small: NodeId,
    layer1: NodeId,
    big: NodeId,
    empty: NodeId,
    spill: NodeId,
    hardlink: NodeId,
    acl: NodeId,
}

fn sample_tree() -> Sample {
    let mut b = Builder::new();
    b.nodes[0].meta.mtime_nsec = 5;

    let etc = b.dir(ROOT, "etc");
    let mut small_meta = meta(0o644);
    small_meta.xattrs = vec![
        (b"security.capability".to_vec(), capability_v2()),
        (b"user.comment".to_vec(), b"hello".to_vec()),
    ]
    .into();
    // A layer-1 file is added first so placement order differs from tree order.
    let layer1 = b.file(etc, "from_layer1", 1, 10_000, meta(0o644));
    let small = b.file(etc, "small", 0, 5000, small_meta);
    let empty = b.file(etc, "empty", 0, 0, meta(0o600));

    let data = b.dir(ROOT, "data");
    let big = b.file(data, "big.bin", 0, BIG_FILE_SIZE, meta(0o644));

    let times = b.dir(ROOT, "times");
    for (name, seconds, nsec) in [
        ("neg", -1i64, 0u32),
        ("zero", 0, 0),
        ("y2100", 4_102_444_800, 123_456_789),
    ] {
        let mut m = meta(0o644);
        m.mtime = seconds;
        m.mtime_nsec = nsec;
        b.file(times, name, 0, 10, m);
    }

    let perm = b.dir(ROOT, "perm");
    b.file(perm, "setuid", 0, 1, meta(0o4755));
    b.file(perm, "setgid", 0, 1, meta(0o2755));
    b.add(
        perm,
        "sticky",
        NodeKind::Dir {
            children: Children::new(),
        },
        meta(0o1777),
    );
    let mut owned = meta(0o640);
    owned.uid = 3_000_000;
    owned.gid = 3_000_001;
    b.file(perm, "owned", 0, 1, owned);

    let xattrs = b.dir(ROOT, "xattr");
    let mut spill_meta = meta(0o644);
    spill_meta.xattrs = vec![
        (
            b"security.selinux".to_vec(),
            b"system_u:object_r:bin_t:s0\0".to_vec(),
        ),
        (b"trusted.x".to_vec(), vec![0xab; 16]),
        (b"user.a".to_vec(), vec![b'a'; 1000]),
        (b"user.b".to_vec(), vec![b'b'; 1500]),
    ]
    .into();
    let spill = b.file(xattrs, "spill", 0, 100, spill_meta);
    let mut acl_meta = meta(0o640);
    acl_meta.xattrs = vec![(b"system.posix_acl_access".to_vec(), posix_acl())].into();
    let acl = b.file(xattrs, "acl", 0, 1, acl_meta);

    let links = b.dir(ROOT, "links");
    let other = b.dir(ROOT, "other");
    let hardlink = b.file(links, "a", 0, 3000, meta(0o644));
    b.link(links, "c", hardlink);
    b.link(other, "b", hardlink);

    let symlinks = b.dir(ROOT, "symlinks");
    for len in [1usize, 59, 60, 61, 300] {
        let target = "t".repeat(len).into_bytes();
        b.add(
            symlinks,
            &format!("len{len}"),
            NodeKind::Symlink { target },
            meta(0o777),
        );
    }

    let dev = b.dir(ROOT, "dev");
    b.add(
        dev,
        "null",
        NodeKind::CharDev { major: 1, minor: 3 },
        meta(0o666),
    );
    b.add(
        dev,
        "sda",
        NodeKind::BlockDev { major: 8, minor: 0 },
        meta(0o660),
    );
    b.add(
        dev,
        "nvme",
        NodeKind::BlockDev {
            major: 259,
            minor: 70000,
        },
        meta(0o660),
    );
    b.add(dev, "fifo", NodeKind::Fifo, meta(0o644));

    let middir = b.dir(ROOT, "middir");
    for i in 0..1000 {
        b.file(middir, &format!("m{i}"), 0, 0, meta(0o644));
    }
    // Bytes above 0x7f exercise the unsigned-char variant of the name hash.
    for i in 0..50 {
        b.file(middir, &format!("\u{fc}ber-{i}"), 0, 0, meta(0o644));
    }
    let bigdir = b.dir(ROOT, "bigdir");
    for i in 0..BIGDIR_ENTRIES {
        b.file(bigdir, &bigdir_name(i), 0, 0, meta(0o644));
    }

    Sample {
        tree: b.build(),
        small,
        layer1,
        big,
        empty,
        spill,
        hardlink,
        acl,
    }
}

fn options() -> LayoutOptions {
    LayoutOptions {
        uuid: *b"0123456789abcdef",
        hash_seed: [7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        volume_name: "esgz-test".to_owned(),
        extra_free_blocks: 1000,
    }
}

fn assert_file_content(path: &Path, node: NodeId, size: u64) {
    let file = File::open(path).unwrap_or_else(|err| panic!("open {}: {err}", path.display()));
    assert_eq!(
        file.metadata().unwrap().len(),
        size,
        "size of {}",
        path.display()
    );
    let ranges = if size <= 2 * SAMPLED_BYTES {
        vec![(0, size)]
    } else {
        vec![(0, SAMPLED_BYTES), (size - SAMPLED_BYTES, size)]
    };
    for (start, end) in ranges {
        let mut actual = vec![0u8; (end - start) as usize];
        file.read_exact_at(&mut actual, start)
            .expect("read file content");
        let mut expected = vec![0u8; actual.len()];
        fill_file_bytes(node, start, &mut expected);
        assert!(
            actual == expected,
            "content of {} at {start}..{end}",
            path.display()
        );
    }
}

#[test]
fn sample_image_passes_e2fsck_debugfs_and_mount() {
    let sample = sample_tree();
    let tree = sample.tree.clone();
    let layout = Layout::new(tree.clone(), options()).expect("layout");
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("image.ext4");
    write_image(&layout, &tree, &image);

    e2fsck_clean(&image);

    // Placement order: layer 0 by data offset, then layer 1.
    let small_start = layout
        .file_start_block(sample.small)
        .expect("small file placed");
    let big_start = layout
        .file_start_block(sample.big)
        .expect("big file placed");
    let layer1_start = layout
        .file_start_block(sample.layer1)
        .expect("layer-1 file placed");
    assert!(
        small_start < big_start && big_start < layer1_start,
        "files in (layer, data_offset) order"
    );
    assert_eq!(layout.file_start_block(sample.empty), None);

    let lost_found = debugfs(&image, "stat /lost+found");
    assert!(
        lost_found.contains("Inode: 11 "),
        "lost+found inode: {lost_found}"
    );
    assert!(
        lost_found.contains("Mode:  0700"),
        "lost+found mode: {lost_found}"
    );
    let ea_list = debugfs(&image, "ea_list /xattr/spill");
    for name in ["security.selinux", "trusted.x", "user.a", "user.b"] {
        assert!(ea_list.contains(name), "ea_list lacks {name}: {ea_list}");
    }
    let htree = debugfs(&image, "htree /bigdir");
    assert!(
        htree.contains("Indirect levels: 1"),
        "bigdir has two index levels: {}",
        &htree[..htree.len().min(500)]
    );
    let big_stat = debugfs(&image, "stat /data/big.bin");
    assert!(
        big_stat.contains("EXTENTS:\n(ETB0)"),
        "big file has an extent tree block: {big_stat}"
    );

    let mount_dir = dir.path().join("mnt");
    std::fs::create_dir(&mount_dir).unwrap();
    let mounted = MountGuard::mount(&image, &mount_dir);
    let root = mounted.dir.clone();
    let stat = |relative: &str| {
        std::fs::symlink_metadata(root.join(relative))
            .unwrap_or_else(|err| panic!("stat {relative}: {err}"))
    };

    assert_eq!(stat(".").ino(), 2);
    assert_eq!(stat(".").mtime_nsec(), 5);
    assert_eq!(stat("lost+found").ino(), 11);
    assert_eq!(
        stat("etc/small").ino(),
        u64::from(layout.inode_of(sample.small))
    );
    let root_subdirs = std::fs::read_dir(&root)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_type().unwrap().is_dir())
        .count();
    assert_eq!(stat(".").nlink(), 2 + root_subdirs as u64);

    for (path, seconds, nsec) in [
        ("times/neg", -1i64, 0i64),
        ("times/zero", 0, 0),
        ("times/y2100", 4_102_444_800, 123_456_789),
    ] {
        let m = stat(path);
        assert_eq!(
            (m.mtime(), m.mtime_nsec()),
            (seconds, nsec),
            "mtime of {path}"
        );
        assert_eq!(
            (m.ctime(), m.atime()),
            (seconds, seconds),
            "ctime/atime of {path}"
        );
    }

    for (path, mode) in [
        ("perm/setuid", 0o104755),
        ("perm/setgid", 0o102755),
        ("perm/sticky", 0o041777),
        ("dev/fifo", 0o010644),
    ] {
        assert_eq!(stat(path).mode(), mode, "mode of {path}");
    }
    assert_eq!(
        (stat("perm/owned").uid(), stat("perm/owned").gid()),
        (3_000_000, 3_000_001)
    );

    for (path, major, minor, mode) in [
        ("dev/null", 1, 3, 0o020666),
        ("dev/sda", 8, 0, 0o060660),
        ("dev/nvme", 259, 70000, 0o060660),
    ] {
        let m = stat(path);
        assert_eq!(m.mode(), mode, "mode of {path}");
        assert_eq!(
            device_numbers(m.rdev()),
            (major, minor),
            "device number of {path}"
        );
    }

    for len in [1usize, 59, 60, 61, 300] {
        let target = std::fs::read_link(root.join(format!("symlinks/len{len}"))).expect("readlink");
        assert_eq!(target.as_os_str().len(), len, "symlink len{len}");
        assert!(target.to_str().unwrap().bytes().all(|byte| byte == b't'));
    }

    assert_eq!(stat("links/a").nlink(), 3);
    assert_eq!(stat("links/a").ino(), stat("other/b").ino());
    assert_eq!(
        stat("links/c").ino(),
        u64::from(layout.inode_of(sample.hardlink))
    );

    let small = root.join("etc/small");
    assert_eq!(getfattr(&small, "user.comment"), b"hello");
    assert_eq!(getfattr(&small, "security.capability"), capability_v2());
    let spill = root.join("xattr/spill");
    assert_eq!(getfattr(&spill, "user.a"), vec![b'a'; 1000]);
    assert_eq!(getfattr(&spill, "user.b"), vec![b'b'; 1500]);
    assert_eq!(getfattr(&spill, "trusted.x"), vec![0xab; 16]);
    assert_eq!(
        getfattr(&spill, "security.selinux"),
        b"system_u:object_r:bin_t:s0\0"
    );
    assert_eq!(
        getfattr(&root.join("xattr/acl"), "system.posix_acl_access"),
        posix_acl()
    );

    for (path, node) in [
        ("etc/small", sample.small),
        ("etc/from_layer1", sample.layer1),
        ("data/big.bin", sample.big),
        ("xattr/spill", sample.spill),
        ("xattr/acl", sample.acl),
        ("links/a", sample.hardlink),
        ("etc/empty", sample.empty),
    ] {
        assert_file_content(&root.join(path), node, file_size(&tree, node));
    }

    let bigdir_count = std::fs::read_dir(root.join("bigdir")).unwrap().count();
    assert_eq!(bigdir_count, BIGDIR_ENTRIES);
    for i in [0, 1, 4999, 12345, BIGDIR_ENTRIES - 1] {
        stat(&format!("bigdir/{}", bigdir_name(i)));
    }
    assert!(std::fs::symlink_metadata(root.join("bigdir/entry-missing")).is_err());
    assert_eq!(
        std::fs::read_dir(root.join("middir")).unwrap().count(),
        1050
    );
    stat("middir/m999");
    stat("middir/\u{fc}ber-49");
    drop(mounted);
}

#[test]
fn layout_is_deterministic() {
    let render_all = || {
        let layout = Layout::new(sample_tree().tree, options()).expect("layout");
        let mut digest: u64 = 0;
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        for segment in layout.segments(0, layout.block_count()) {
            if segment.kind == SegmentKind::Metadata {
                for b in segment.start_block..segment.start_block + segment.block_count {
                    layout.render_metadata(b, &mut block);
                    for chunk in block.chunks(8) {
                        digest = splitmix64(digest ^ u64::from_le_bytes(chunk.try_into().unwrap()));
                    }
                }
            }
        }
        (
            layout.block_count(),
            layout.segments(0, layout.block_count()),
            digest,
        )
    };
    assert_eq!(render_all(), render_all());
}

#[test]
fn segments_cover_requested_range() {
    let layout = Layout::new(sample_tree().tree, options()).expect("layout");
    let total = layout.block_count();
    let ranges = [
        (0, total),
        (0, 1),
        (total - 1, 1),
        (total / 3, 12345),
        (total - 10, 20),
    ];
    for (start, count) in ranges {
        let segments = layout.segments(start, count);
        let mut next = start;
        for segment in &segments {
            assert_eq!(
                segment.start_block, next,
                "segments of {start}+{count} are contiguous"
            );
            assert!(segment.block_count > 0);
            next += segment.block_count;
        }
        assert_eq!(
            next,
            start + count,
            "segments of {start}+{count} end at the range end"
        );
    }

    // A file segment that starts mid-file carries the matching offset.
    let sample = sample_tree();
    let layout = Layout::new(sample.tree.clone(), options()).expect("layout");
    let big_start = layout.file_start_block(sample.big).unwrap();
    let segments = layout.segments(big_start + 10, 5);
    assert_eq!(
        segments,
        vec![Segment {
            start_block: big_start + 10,
            block_count: 5,
            kind: SegmentKind::File {
                node: sample.big,
                file_offset: 10 * BLOCK_SIZE
            }
        }]
    );
}

#[test]
fn layout_rejects_unrepresentable_trees() {
    type Mutation = Box<dyn Fn(&mut Builder)>;
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "empty_symlink",
            Box::new(|b| {
                b.add(
                    ROOT,
                    "s",
                    NodeKind::Symlink { target: Vec::new() },
                    meta(0o777),
                );
            }),
            "EmptySymlink",
        ),
        (
            "long_symlink",
            Box::new(|b| {
                b.add(
                    ROOT,
                    "s",
                    NodeKind::Symlink {
                        target: vec![b'x'; 4096],
                    },
                    meta(0o777),
                );
            }),
            "SymlinkTooLong",
        ),
        (
            "major_too_large",
            Box::new(|b| {
                b.add(
                    ROOT,
                    "d",
                    NodeKind::CharDev {
                        major: 4096,
                        minor: 0,
                    },
                    meta(0o600),
                );
            }),
            "DeviceNumberTooLarge",
        ),
        (
            "time_too_early",
            Box::new(|b| {
                let mut m = meta(0o644);
                m.mtime = -(1 << 31) - 1;
                b.file(ROOT, "f", 0, 1, m);
            }),
            "TimeOutOfRange",
        ),
        (
            "mode_with_type_bits",
            Box::new(|b| {
                b.file(ROOT, "f", 0, 1, meta(0o100644));
            }),
            "InvalidMode",
        ),
        (
            "xattrs_too_large",
            Box::new(|b| {
                let mut m = meta(0o644);
                m.xattrs = vec![
                    (b"user.a".to_vec(), vec![0; 3000]),
                    (b"user.b".to_vec(), vec![0; 3000]),
                ]
                .into();
                b.file(ROOT, "f", 0, 1, m);
            }),
            "XattrsTooLarge",
        ),
        (
            "malformed_acl",
            Box::new(|b| {
                let mut m = meta(0o644);
                m.xattrs = vec![(b"system.posix_acl_access".to_vec(), vec![1, 0, 0, 0])].into();
                b.file(ROOT, "f", 0, 1, m);
            }),
            "InvalidXattr",
        ),
        (
            "directory_linked_twice",
            Box::new(|b| {
                let d = b.dir(ROOT, "d");
                b.link(ROOT, "e", d);
            }),
            "DirectoryLinkedTwice",
        ),
        (
            "dangling_child",
            Box::new(|b| {
                b.link(ROOT, "ghost", 999);
            }),
            "DanglingNode",
        ),
    ];
    for (name, build, expected) in cases {
        let mut builder = Builder::new();
        build(&mut builder);
        let err = Layout::new(builder.build(), options()).expect_err(name);
        assert!(
            format!("{err:?}").starts_with(expected),
            "{name}: got {err:?}"
        );
    }

    let long_name = LayoutOptions {
        volume_name: "x".repeat(17),
        ..options()
    };
    assert!(matches!(
        Layout::new(Builder::new().build(), long_name),
        Err(LayoutError::VolumeNameTooLong { .. })
    ));
}

#[test]
fn minimal_tree_passes_e2fsck() {
    let layout = Layout::new(Builder::new().build(), LayoutOptions::default()).expect("layout");
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("min.ext4");
    write_image(&layout, &Builder::new().build(), &image);
    e2fsck_clean(&image);
}

#[test]
fn half_md4_matches_debugfs_dx_hash() {
    let seed_bytes: [u8; 16] = [7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
    let seed: [u32; 4] = std::array::from_fn(|i| {
        u32::from_le_bytes(seed_bytes[4 * i..4 * i + 4].try_into().unwrap())
    });
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        hex::encode(&seed_bytes[0..4]),
        hex::encode(&seed_bytes[4..6]),
        hex::encode(&seed_bytes[6..8]),
        hex::encode(&seed_bytes[8..10]),
        hex::encode(&seed_bytes[10..16])
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("hash.ext4");
    let layout = Layout::new(Builder::new().build(), LayoutOptions::default()).expect("layout");
    write_image(&layout, &Builder::new().build(), &image);

    // ASCII names hash the same with signed and unsigned chars, and debugfs
    // 1.47 names only the signed variant "half_md4".
    let long_name = "x".repeat(100);
    for name in [
        "a",
        "hello",
        "file_00001",
        "exactly-32-bytes-long-name-12345",
        long_name.as_str(),
    ] {
        let (hash, minor) = htree::half_md4_hash(name.as_bytes(), seed);
        let output = debugfs(&image, &format!("dx_hash -h half_md4 -s {uuid} {name}"));
        let expected = format!("is {hash:#x} (minor {minor:#x})");
        assert!(
            output.contains(&expected),
            "{name}: expected {expected}, debugfs printed {output}"
        );
    }
}

#[test]
fn depth_two_extent_tree_passes_e2fsck() {
    // 200 GiB needs 6400 extents: 19 leaves, more than the 4 root entries,
    // so one more index level sits between the root and the leaves.
    let mut b = Builder::new();
    let huge = b.file(ROOT, "huge", 0, 200 * GIB, meta(0o644));
    let tree = b.build();
    let layout = Layout::new(tree.clone(), LayoutOptions::default()).expect("layout");
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("huge.ext4");
    write_image(&layout, &tree, &image);

    e2fsck_clean(&image);
    let stat = debugfs(&image, "stat /huge");
    assert!(
        stat.contains("(ETB1)"),
        "huge file has a two-level extent tree: {}",
        &stat[..stat.len().min(800)]
    );
    assert!(layout.file_start_block(huge).is_some());
}

/// A writable layout of the sample tree: spare inodes and a journal.
fn writable_layout(journal_blocks: u64) -> (Layout, Arc<Tree>) {
    let sample = sample_tree();
    let writable = WritableOptions {
        spare_inodes: 5000,
        journal_blocks,
    };
    let options = LayoutOptions {
        extra_free_blocks: 20_000,
        ..options()
    };
    let layout =
        Layout::new_writable(sample.tree.clone(), options, writable).expect("writable layout");
    (layout, sample.tree)
}

#[test]
fn writable_layout_has_clean_journal_and_mounts_read_write() {
    let (layout, tree) = writable_layout(4096);
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("writable.ext4");
    write_image(&layout, &tree, &image);
    e2fsck_clean(&image);

    let stats = debugfs(&image, "stats");
    assert!(stats.contains("has_journal"), "features: {stats}");
    assert!(
        stats.contains("Journal inode:            8"),
        "stats: {stats}"
    );
    let free_inodes: u64 = stats
        .lines()
        .find_map(|line| line.strip_prefix("Free inodes:"))
        .and_then(|value| value.trim().parse().ok())
        .expect("Free inodes line");
    assert!(free_inodes >= 5000, "free inodes {free_inodes}");
    // s_start 0 (clean) and sequence 1, as mke2fs 1.47 leaves a new journal.
    let logdump = debugfs(&image, "logdump -S");
    for expected in [
        "Total journal blocks:     4096",
        "Journal sequence:         0x00000001",
        "Journal start:            0",
        "Journal starts at block 0, transaction 1",
    ] {
        assert!(
            logdump.contains(expected),
            "expected {expected:?} in logdump: {logdump}"
        );
    }

    // The kernel replays and writes the journal on a read-write mount.
    let mount_point = dir.path().join("mnt");
    std::fs::create_dir(&mount_point).expect("mount point");
    let (code, _, stderr) = run(
        "mount",
        &[
            "-t",
            "ext4",
            "-o",
            "loop",
            image.to_str().unwrap(),
            mount_point.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "read-write mount failed: {stderr}");
    let guard = MountGuard {
        dir: mount_point.clone(),
    };
    for i in 0..200 {
        std::fs::write(mount_point.join(format!("new-{i}")), vec![i as u8; 10_000])
            .expect("create a file on the mounted image");
    }
    std::fs::create_dir(mount_point.join("new-dir")).expect("mkdir");
    drop(guard);

    e2fsck_clean(&image);
    let listing = debugfs(&image, "ls -l /");
    assert!(listing.contains("new-199"), "listing: {listing}");
}

#[test]
fn large_journal_gets_extent_tree_and_passes_e2fsck() {
    // More than four extents of 32768 blocks need an extent tree block.
    let (layout, tree) = writable_layout(140_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("journal.ext4");
    write_image(&layout, &tree, &image);
    e2fsck_clean(&image);
    let stat = debugfs(&image, "stat <8>");
    assert!(
        stat.contains("(ETB0)"),
        "journal extent tree: {}",
        &stat[..stat.len().min(800)]
    );
}

#[test]
fn writable_options_change_only_writable_layouts() {
    let sample = sample_tree();
    let plain = Layout::new(sample.tree.clone(), options()).expect("layout");
    let default_writable =
        Layout::new_writable(sample.tree.clone(), options(), WritableOptions::default())
            .expect("layout");
    let (journaled, _) = writable_layout(4096);
    let mut a = vec![0u8; BLOCK_SIZE as usize];
    let mut b = vec![0u8; BLOCK_SIZE as usize];
    for block in 0..plain.block_count().min(200) {
        plain.render_metadata(block, &mut a);
        default_writable.render_metadata(block, &mut b);
        assert_eq!(a, b, "block {block}");
    }
    assert_eq!(plain.fingerprint(), default_writable.fingerprint());
    assert_ne!(plain.fingerprint(), journaled.fingerprint());
    assert!(matches!(
        Layout::new_writable(
            sample.tree,
            options(),
            WritableOptions {
                spare_inodes: 0,
                journal_blocks: 100
            }
        ),
        Err(LayoutError::JournalTooSmall { .. })
    ));
}

#[test]
fn htree_root_with_lost_found_passes_e2fsck() {
    // Names before and after "lost+found" in name order, enough to make the
    // root a hash-indexed directory, so the added lost+found sits in the
    // middle of the list its leaves are rendered from.
    let mut b = Builder::new();
    let names: Vec<String> = (0..600)
        .map(|i| format!("{}-entry-{i:04}", ["a", "m", "z"][i % 3]))
        .collect();
    for name in &names {
        b.file(ROOT, name, 0, 1, meta(0o644));
    }
    let tree = b.build();
    let layout = Layout::new(tree.clone(), options()).expect("layout");
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("root-htree.ext4");
    write_image(&layout, &tree, &image);
    e2fsck_clean(&image);

    let htree = debugfs(&image, "htree /");
    assert!(
        htree.contains("Root node dump"),
        "the root is hash-indexed: {}",
        &htree[..htree.len().min(500)]
    );
    let listing = debugfs(&image, "ls /");
    assert!(listing.contains("lost+found"), "lost+found listed");
    for name in [&names[0], &names[1], &names[2], &names[599]] {
        assert!(listing.contains(name.as_str()), "{name} listed");
    }
}
