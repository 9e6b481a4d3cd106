//! Access recording: the image paths of the regular files whose data blocks
//! NBD clients read, in first-read order, written as a `convert --prioritize`
//! list.
//!
//! Only [`ImageDisk`](crate::disk::ImageDisk) reads report here. The
//! start-up prefetch and the background fetch go to the chunk store directly,
//! so they never appear in the list.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tracing::{debug, warn};

use crate::ext4::{Segment, SegmentKind};
use crate::tree::{NodeId, NodeKind, Tree, ROOT};

/// Appends the path of each regular file to a file the first time a client
/// reads one of its data blocks.
pub struct AccessRecorder {
    /// Path written for each node: `Some` for regular files that a
    /// directory entry reaches, the first such path in name order.
    paths: Vec<Option<String>>,
    /// Whether the node's path was already handled (written or skipped).
    seen: Vec<AtomicBool>,
    output: Mutex<Output>,
}

struct Output {
    file: File,
    path: PathBuf,
    /// Set after the first failed write; later paths are not written, so
    /// the list never has a gap in its order.
    failed: bool,
}

impl AccessRecorder {
    /// Creates (or truncates) `path` with mode 0600 and returns a recorder
    /// that writes the paths of `tree`'s files to it.
    pub fn create(tree: &Tree, path: &Path) -> anyhow::Result<Arc<AccessRecorder>> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| {
                format!(
                    "failed to create the access record {}: check that its folder exists and is writable",
                    path.display()
                )
            })?;
        // `mode` applies only when the file is new; an older file keeps its
        // permissions through the truncation unless they are set again.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("failed to make {} private (mode 0600)", path.display()))?;
        let paths = file_paths(tree);
        let seen = (0..paths.len()).map(|_| AtomicBool::new(false)).collect();
        Ok(Arc::new(AccessRecorder {
            paths,
            seen,
            output: Mutex::new(Output {
                file,
                path: path.to_path_buf(),
                failed: false,
            }),
        }))
    }

    /// Records the regular files that the device `segments` of one client
    /// read belong to.
    pub fn record_read(&self, segments: &[Segment]) {
        for segment in segments {
            if let SegmentKind::File { node, .. } = segment.kind {
                self.record_node(node);
            }
        }
    }

    /// Writes the path of `node` unless it was written before.
    fn record_node(&self, node: NodeId) {
        let Some(seen) = self.seen.get(node as usize) else {
            return;
        };
        if seen.load(Ordering::Relaxed) {
            return;
        }

        // The lock makes the check and the write one step, so the file
        // order is the order in which reads reached this point.
        let Ok(mut output) = self.output.lock() else {
            return;
        };
        if seen.swap(true, Ordering::Relaxed) {
            return;
        }
        let Some(Some(path)) = self.paths.get(node as usize) else {
            return;
        };
        if output.failed {
            return;
        }
        // One write per line: a server killed after it still leaves whole lines.
        let line = format!("{path}\n");
        if let Err(error) = output.file.write_all(line.as_bytes()) {
            output.failed = true;
            warn!(
                record = %output.path.display(),
                %error,
                "failed to append to the access record: no further paths are recorded"
            );
        }
    }
}

/// Returns, for each node of `tree`, the path of a regular file as a
/// `--prioritize` line (`/usr/bin/env`), or `None`.
///
/// A hard-linked file gets its first path in name order. Paths that a
/// `--prioritize` list cannot hold (not UTF-8, with a newline, or with
/// whitespace at the end, which the list reader trims) get `None`.
fn file_paths(tree: &Tree) -> Vec<Option<String>> {
    let mut paths: Vec<Option<String>> = vec![None; tree.nodes.len()];
    let mut skipped = 0usize;
    let mut stack: Vec<(NodeId, Vec<u8>)> = vec![(ROOT, Vec::new())];

    while let Some((id, prefix)) = stack.pop() {
        let NodeKind::Dir { children } = &tree.node(id).kind else {
            continue;
        };
        // Reversed, so the stack pops children in name order.
        for (name, child) in children.iter().rev() {
            let mut path = prefix.clone();
            path.push(b'/');
            path.extend_from_slice(name);
            match &tree.node(child).kind {
                NodeKind::Dir { .. } => stack.push((child, path)),
                NodeKind::Reg { .. } => {
                    if paths[child as usize].is_some() {
                        continue;
                    }
                    match list_line(path) {
                        Some(line) => paths[child as usize] = Some(line),
                        None => skipped += 1,
                    }
                }
                _ => {}
            }
        }
    }
    if skipped > 0 {
        debug!(
            skipped,
            "files whose names a --prioritize list cannot hold are not recorded"
        );
    }
    paths
}

/// Returns `path` as a `--prioritize` line, or `None` if the list reader
/// would not read it back unchanged.
fn list_line(path: Vec<u8>) -> Option<String> {
    let text = String::from_utf8(path).ok()?;
    if text.contains('\n') || text.contains('\r') || text.trim_end() != text {
        return None;
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ext4::{Layout, LayoutOptions};
    use crate::tree::{Children, FileData, Metadata, Node};

    /// A tree builder that gives each file its own range of layer 0.
    struct TreeBuilder {
        nodes: Vec<Node>,
        data_end: u64,
    }

    impl TreeBuilder {
        fn new() -> TreeBuilder {
            TreeBuilder {
                nodes: vec![Node {
                    kind: NodeKind::Dir {
                        children: Children::new(),
                    },
                    meta: meta(0o755),
                }],
                data_end: 0,
            }
        }

        fn link(&mut self, parent: NodeId, name: &[u8], child: NodeId) {
            let NodeKind::Dir { children } = &mut self.nodes[parent as usize].kind else {
                panic!("node {parent} is not a directory");
            };
            children.insert(name, child);
        }

        fn add(&mut self, parent: NodeId, name: &[u8], kind: NodeKind) -> NodeId {
            let id = self.nodes.len() as NodeId;
            self.nodes.push(Node {
                kind,
                meta: meta(0o644),
            });
            self.link(parent, name, id);
            id
        }

        fn dir(&mut self, parent: NodeId, name: &str) -> NodeId {
            let children = Children::new();
            self.add(parent, name.as_bytes(), NodeKind::Dir { children })
        }

        fn file(&mut self, parent: NodeId, name: &[u8], size: u64) -> NodeId {
            let data = FileData {
                layer: 0,
                data_offset: self.data_end,
                size,
            };
            self.data_end += size;
            self.add(parent, name, NodeKind::Reg { data })
        }

        fn build(self) -> Arc<Tree> {
            Arc::new(Tree { nodes: self.nodes })
        }
    }

    fn meta(mode: u16) -> Metadata {
        Metadata {
            mode,
            ..Metadata::default()
        }
    }

    struct Sample {
        tree: Arc<Tree>,
        layout: Layout,
        env: NodeId,
        dash: NodeId,
        big: NodeId,
        bad_name: NodeId,
    }

    /// `/usr/bin/env`, `/bin/dash` (also linked as `/usr/bin/sh`), a
    /// 40 KiB `/big`, an empty file and a file whose name ends in a space.
    fn sample() -> Sample {
        let mut builder = TreeBuilder::new();
        let usr = builder.dir(ROOT, "usr");
        let usr_bin = builder.dir(usr, "bin");
        let bin = builder.dir(ROOT, "bin");
        let env = builder.file(usr_bin, b"env", 100);
        let dash = builder.file(bin, b"dash", 5000);
        builder.link(usr_bin, b"sh", dash);
        let big = builder.file(ROOT, b"big", 40 * 1024);
        builder.file(ROOT, b"empty", 0);
        let bad_name = builder.file(ROOT, b"trailing ", 10);
        let tree = builder.build();
        let layout = Layout::new(tree.clone(), LayoutOptions::default()).expect("layout");
        Sample {
            tree,
            layout,
            env,
            dash,
            big,
            bad_name,
        }
    }

    fn start_block(sample: &Sample, node: NodeId) -> u64 {
        sample
            .layout
            .file_start_block(node)
            .unwrap_or_else(|| panic!("node {node} has data blocks"))
    }

    #[test]
    fn file_paths_pick_first_name() {
        let sample = sample();
        let paths = file_paths(&sample.tree);
        assert_eq!(paths[sample.env as usize].as_deref(), Some("/usr/bin/env"));
        // `/bin/dash` sorts before `/usr/bin/sh`.
        assert_eq!(paths[sample.dash as usize].as_deref(), Some("/bin/dash"));
        assert_eq!(paths[sample.big as usize].as_deref(), Some("/big"));
        assert_eq!(paths[sample.bad_name as usize], None);
        assert_eq!(paths[ROOT as usize], None);
    }

    #[test]
    fn list_line_rejects_unreadable_names() {
        let cases: [(&[u8], Option<&str>); 6] = [
            (b"/a/b", Some("/a/b")),
            (b"/# not a comment", Some("/# not a comment")),
            (b"/ lead", Some("/ lead")),
            (b"/trail ", None),
            (b"/new\nline", None),
            (b"/\xff", None),
        ];
        for (input, expected) in cases {
            assert_eq!(
                list_line(input.to_vec()).as_deref(),
                expected,
                "input {input:?}"
            );
        }
    }

    #[test]
    fn record_read_writes_first_reads_in_order() {
        let sample = sample();
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("access.txt");
        let recorder = AccessRecorder::create(&sample.tree, &out).expect("recorder");

        // Metadata blocks (the superblock) map to no file.
        recorder.record_read(&sample.layout.segments(0, 4));
        // The middle of /big, then /bin/dash, /big again, then one read
        // spanning /usr/bin/env and its neighbours.
        let big = start_block(&sample, sample.big);
        recorder.record_read(&sample.layout.segments(big + 5, 2));
        let dash = start_block(&sample, sample.dash);
        recorder.record_read(&sample.layout.segments(dash + 1, 1));
        recorder.record_read(&sample.layout.segments(big, 1));
        let env = start_block(&sample, sample.env);
        recorder.record_read(&sample.layout.segments(env, 1));

        let text = std::fs::read_to_string(&out).expect("reading the record");
        assert_eq!(text, "/big\n/bin/dash\n/usr/bin/env\n");
    }

    #[test]
    fn record_read_covers_every_file_of_a_range() {
        let sample = sample();
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("access.txt");
        let recorder = AccessRecorder::create(&sample.tree, &out).expect("recorder");

        recorder.record_read(&sample.layout.segments(0, sample.layout.block_count()));

        let text = std::fs::read_to_string(&out).expect("reading the record");
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort_unstable();
        assert_eq!(lines, ["/big", "/bin/dash", "/usr/bin/env"]);
    }

    #[test]
    fn record_file_is_private_and_read_back() {
        let sample = sample();
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("access.txt");
        std::fs::write(&out, "stale\n").expect("writing a stale record");
        let recorder = AccessRecorder::create(&sample.tree, &out).expect("recorder");
        let dash = start_block(&sample, sample.dash);
        recorder.record_read(&sample.layout.segments(dash, 1));

        let mode = std::fs::metadata(&out).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        let list = crate::convert::read_prioritize_file(&out).expect("reading the list");
        assert_eq!(list, ["/bin/dash"]);
    }
}
