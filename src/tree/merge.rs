//! OCI layer merge: whiteouts, opaque directories and hard links, per the
//! OCI image-spec "Image Layer Filesystem Changeset" rules.
//!
//! Each layer is applied in two passes. The first applies its whiteouts to
//! the tree built from the lower layers, because the spec says whiteouts
//! "MUST only apply to resources in lower/parent layers": an entry of the
//! same layer stays, wherever the marker sits in the tar. The second pass
//! adds the layer's entries in order, so a later entry at the same path
//! replaces an earlier one.

use std::collections::BTreeMap;

use tracing::{debug, warn};

use super::{
    components_of, display_joined, Children, EntryKind, EntryPath, LayerEntry, Metadata, Node,
    NodeId, NodeKind, Tree, ROOT,
};

/// Prefix of OCI whiteout file names.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Name of the OCI opaque-directory marker.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Entries applied between two releases of the unused part of a layer's
/// entry list.
const RELEASE_STEP: usize = 1 << 16;
/// Maximum length of a name component in the tree, in bytes.
const MAX_NAME_LEN: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("layer {layer} (0 = lowest): hard link {path:?} names missing target {target:?}")]
    MissingHardlinkTarget {
        layer: usize,
        path: String,
        target: String,
    },

    #[error(
        "layer {layer} (0 = lowest): hard link {path:?} names directory {target:?}; \
         hard links to directories are not allowed"
    )]
    HardlinkToDirectory {
        layer: usize,
        path: String,
        target: String,
    },

    #[error("layer {layer} (0 = lowest): the root entry is a {kind}, not a directory")]
    RootNotDirectory { layer: usize, kind: &'static str },

    #[error(
        "layer {layer} (0 = lowest): entry {path:?} has an invalid name component \
         {component:?} (empty, '.', '..', over 255 bytes, or containing '/' or NUL)"
    )]
    InvalidName {
        layer: usize,
        path: String,
        component: String,
    },

    #[error("the merged tree needs more than {limit} nodes")]
    TooManyNodes { limit: u64 },
}

/// Applies `layers` (lowest first) to an empty root and returns the tree.
///
/// Missing parent directories are created with mode 0755, owner 0:0 and
/// mtime 0; a non-directory standing where a parent directory must be is
/// replaced by such a directory, as an overlay mount of the layers shows it.
/// A hard link shares the node of its target path as the tree is when
/// the link is applied, so the link keeps the content if an upper layer
/// later whites the target out; the link entry's own metadata is ignored,
/// as it is when a tar is extracted. The node ids of the result are
/// assigned in depth-first order by name, so equal input gives equal trees.
pub fn merge(layers: &[Vec<LayerEntry>]) -> Result<Tree, MergeError> {
    merge_owned(layers.to_vec())
}

/// Like [`merge`], but takes the layers by value: each entry's name and
/// metadata move into the tree and the rest of it is freed as soon as it
/// is applied, so the entries and the tree are not both held in full.
pub fn merge_owned(layers: Vec<Vec<LayerEntry>>) -> Result<Tree, MergeError> {
    let layer_count = layers.len();
    let mut builder = TreeBuilder {
        nodes: Vec::new(),
        maps: Vec::new(),
        dir_map: Vec::new(),
    };
    builder.push_dir(implied_dir_meta())?;
    for (layer, entries) in layers.into_iter().enumerate() {
        for entry in &entries {
            check_names(layer, entry)?;
        }
        for entry in &entries {
            builder.apply_whiteout(layer, entry);
        }
        // Entries are taken from the end of the reversed list, so the list
        // can hand its memory back while the tree grows.
        let mut entries = entries;
        entries.reverse();
        let mut released = entries.len();
        while let Some(entry) = entries.pop() {
            builder.apply_entry(layer, entry)?;
            if released - entries.len() >= RELEASE_STEP {
                entries.shrink_to_fit();
                released = entries.len();
            }
        }
    }

    let tree = builder.compact();
    debug!(
        layers = layer_count,
        nodes = tree.nodes.len(),
        "merged layers into one tree"
    );
    Ok(tree)
}

fn implied_dir_meta() -> Metadata {
    Metadata {
        mode: 0o755,
        ..Metadata::default()
    }
}

fn check_names(layer: usize, entry: &LayerEntry) -> Result<(), MergeError> {
    for component in entry.path.components() {
        let invalid = component.is_empty()
            || component.len() > MAX_NAME_LEN
            || component == b"."
            || component == b".."
            || component.iter().any(|&byte| byte == b'/' || byte == 0);
        if invalid {
            return Err(MergeError::InvalidName {
                layer,
                path: entry.path.display(),
                component: String::from_utf8_lossy(component).into_owned(),
            });
        }
    }
    Ok(())
}

/// Effect of an entry whose name has the whiteout prefix.
enum Whiteout<'a> {
    /// `.wh..wh..opq`: hide every lower child of the directory.
    Opaque,
    /// `.wh.NAME`: hide NAME from lower layers.
    Remove(&'a [u8]),
    /// A name with the whiteout prefix that removes nothing: other `.wh..wh.`
    /// metadata files of AUFS, or `.wh.`, `.wh..`, `.wh...` that would name
    /// the directory itself or its parent.
    Ignored,
}

fn classify_whiteout(name: &[u8]) -> Option<Whiteout<'_>> {
    let victim = name.strip_prefix(WHITEOUT_PREFIX)?;
    if name == OPAQUE_MARKER {
        return Some(Whiteout::Opaque);
    }
    if victim.starts_with(WHITEOUT_PREFIX) || matches!(victim, b"" | b"." | b"..") {
        return Some(Whiteout::Ignored);
    }
    Some(Whiteout::Remove(victim))
}

/// Returns whether an entry lies at or below a whiteout-named component.
/// Such entries never appear in the tree.
fn under_whiteout_name(path: &[u8]) -> bool {
    components_of(path).any(|component| component.starts_with(WHITEOUT_PREFIX))
}

fn entry_kind_name(kind: &EntryKind) -> &'static str {
    match kind {
        EntryKind::Dir => "directory",
        EntryKind::Reg { .. } => "regular file",
        EntryKind::Symlink { .. } => "symlink",
        EntryKind::Hardlink { .. } => "hard link",
        EntryKind::CharDev { .. } => "character device",
        EntryKind::BlockDev { .. } => "block device",
        EntryKind::Fifo => "fifo",
    }
}

/// `TreeBuilder::dir_map` value of a node that is not a directory.
const NO_MAP: u32 = u32::MAX;

/// The tree under construction. Replaced nodes stay in `nodes` unreachable
/// until [`TreeBuilder::compact`] drops them.
struct TreeBuilder {
    /// The nodes; a directory's [`Children`] stay empty until `compact`.
    nodes: Vec<Node>,
    /// The children of the directories, which entries are added to and
    /// removed from while the layers are applied.
    maps: Vec<BTreeMap<Vec<u8>, NodeId>>,
    /// For each node, the index of its children in `maps`, or [`NO_MAP`].
    dir_map: Vec<u32>,
}

impl TreeBuilder {
    fn children(&self, id: NodeId) -> Option<&BTreeMap<Vec<u8>, NodeId>> {
        self.maps.get(*self.dir_map.get(id as usize)? as usize)
    }

    fn children_mut(&mut self, id: NodeId) -> Option<&mut BTreeMap<Vec<u8>, NodeId>> {
        self.maps.get_mut(*self.dir_map.get(id as usize)? as usize)
    }

    /// Finds the node at `path` (components joined by `/`) without creating
    /// anything.
    fn lookup(&self, path: &[u8]) -> Option<NodeId> {
        let mut current = ROOT;
        for component in components_of(path) {
            current = *self.children(current)?.get(component)?;
        }
        Some(current)
    }

    /// Finds the directory at `path`, or `None` when it is missing or not a
    /// directory.
    fn lookup_dir(&self, path: &[u8]) -> Option<NodeId> {
        let id = self.lookup(path)?;
        self.children(id).map(|_| id)
    }

    /// Adds a node that is not a directory.
    fn push_node(&mut self, kind: NodeKind, meta: Metadata) -> Result<NodeId, MergeError> {
        // NO_MAP is u32::MAX, so ids (and map indexes) stay below it.
        let id = NodeId::try_from(self.nodes.len())
            .ok()
            .filter(|&id| id < NO_MAP)
            .ok_or(MergeError::TooManyNodes {
                limit: u64::from(NO_MAP),
            })?;
        self.nodes.push(Node { kind, meta });
        self.dir_map.push(NO_MAP);
        Ok(id)
    }

    /// Adds an empty directory.
    fn push_dir(&mut self, meta: Metadata) -> Result<NodeId, MergeError> {
        let kind = NodeKind::Dir {
            children: Children::new(),
        };
        let id = self.push_node(kind, meta)?;
        // There are no more maps than nodes, so the index fits like the id.
        self.dir_map[id as usize] = self.maps.len() as u32;
        self.maps.push(BTreeMap::new());
        Ok(id)
    }

    /// Returns the directory at `path` (components joined by `/`), creating
    /// missing directories and replacing non-directories on the way.
    fn ensure_dir(&mut self, path: &[u8]) -> Result<NodeId, MergeError> {
        let mut current = ROOT;
        let mut walked = 0;
        for component in components_of(path) {
            walked += component.len() + usize::from(walked > 0);
            let existing = self
                .children(current)
                .and_then(|children| children.get(component))
                .copied();
            current = match existing {
                Some(id) if self.children(id).is_some() => id,
                other => {
                    if other.is_some() {
                        debug!(
                            path = %display_joined(&path[..walked]),
                            "replacing a non-directory by an implied parent directory"
                        );
                    }
                    let id = self.push_dir(implied_dir_meta())?;
                    self.insert_child(current, component, id);
                    id
                }
            };
        }
        Ok(current)
    }

    fn insert_child(&mut self, dir: NodeId, name: &[u8], child: NodeId) {
        if let Some(children) = self.children_mut(dir) {
            children.insert(name.to_vec(), child);
        }
    }

    /// First pass: removes what a whiteout entry hides in the lower layers.
    fn apply_whiteout(&mut self, layer: usize, entry: &LayerEntry) {
        let Some((name, parent_path)) = entry.path.split_last() else {
            return;
        };
        let Some(whiteout) = classify_whiteout(name) else {
            return;
        };
        if under_whiteout_name(parent_path) {
            return;
        }
        let Some(parent) = self.lookup_dir(parent_path) else {
            return;
        };

        match whiteout {
            Whiteout::Opaque => {
                if let Some(children) = self.children_mut(parent) {
                    children.clear();
                }
            }
            Whiteout::Remove(victim) => {
                if let Some(children) = self.children_mut(parent) {
                    children.remove(victim);
                }
            }
            Whiteout::Ignored => {
                warn!(
                    layer,
                    path = %entry.path.display(),
                    "ignoring a whiteout-prefixed name that names no removable entry"
                );
            }
        }
    }

    /// Second pass: adds one entry of the layer.
    fn apply_entry(&mut self, layer: usize, entry: LayerEntry) -> Result<(), MergeError> {
        let Some((name, parent_path)) = entry.path.split_last() else {
            return self.apply_root(layer, entry);
        };
        if under_whiteout_name(entry.path.as_bytes()) {
            // The marker implies its directory exists in this layer.
            if !under_whiteout_name(parent_path) {
                self.ensure_dir(parent_path)?;
            }
            return Ok(());
        }

        // Resolve a hard link before creating parents, which may replace nodes.
        let link_target = match &entry.kind {
            EntryKind::Hardlink { target } => Some(self.resolve_hardlink(layer, &entry, target)?),
            _ => None,
        };

        let name = name.to_vec();
        let parent = self.ensure_dir(parent_path)?;
        let LayerEntry { kind, meta, .. } = entry;
        let existing = self
            .children(parent)
            .and_then(|children| children.get(&name))
            .copied();

        let id = match (kind, link_target) {
            (_, Some(target)) => target,
            (EntryKind::Dir, _) => match existing {
                Some(id) if self.children(id).is_some() => {
                    self.nodes[id as usize].meta = meta;
                    return Ok(());
                }
                _ => self.push_dir(meta)?,
            },
            (kind, None) => {
                let kind = match kind {
                    EntryKind::Reg { data } => NodeKind::Reg { data },
                    // A copy, made by the merging thread, so the tree does not
                    // keep the parser's block alive among its freed ones.
                    EntryKind::Symlink { target } => NodeKind::Symlink {
                        target: target.as_slice().to_vec(),
                    },
                    EntryKind::CharDev { major, minor } => NodeKind::CharDev { major, minor },
                    EntryKind::BlockDev { major, minor } => NodeKind::BlockDev { major, minor },
                    EntryKind::Fifo => NodeKind::Fifo,
                    // Handled above: directories, and hard links through `link_target`.
                    EntryKind::Dir | EntryKind::Hardlink { .. } => return Ok(()),
                };
                self.push_node(kind, meta)?
            }
        };
        if let Some(children) = self.children_mut(parent) {
            children.insert(name, id);
        }
        Ok(())
    }

    fn apply_root(&mut self, layer: usize, entry: LayerEntry) -> Result<(), MergeError> {
        match entry.kind {
            EntryKind::Dir => {
                self.nodes[ROOT as usize].meta = entry.meta;
                Ok(())
            }
            ref kind => Err(MergeError::RootNotDirectory {
                layer,
                kind: entry_kind_name(kind),
            }),
        }
    }

    fn resolve_hardlink(
        &self,
        layer: usize,
        entry: &LayerEntry,
        target: &EntryPath,
    ) -> Result<NodeId, MergeError> {
        let id =
            self.lookup(target.as_bytes())
                .ok_or_else(|| MergeError::MissingHardlinkTarget {
                    layer,
                    path: entry.path.display(),
                    target: target.display(),
                })?;
        if self.children(id).is_some() {
            return Err(MergeError::HardlinkToDirectory {
                layer,
                path: entry.path.display(),
                target: target.display(),
            });
        }
        Ok(id)
    }

    /// Keeps only the nodes reachable from the root, numbers them in
    /// depth-first preorder, children by name, and packs each directory's
    /// children (see [`Children`]).
    fn compact(self) -> Tree {
        let TreeBuilder {
            mut nodes,
            mut maps,
            mut dir_map,
        } = self;

        // New ids in preorder; NO_MAP marks an unreachable node.
        let mut new_id: Vec<NodeId> = vec![NO_MAP; nodes.len()];
        let mut reachable: NodeId = 0;
        let mut stack = vec![ROOT];
        while let Some(id) = stack.pop() {
            if new_id[id as usize] != NO_MAP {
                continue;
            }
            // `reachable` never outgrows `nodes`, whose ids stay below NO_MAP.
            new_id[id as usize] = reachable;
            reachable += 1;
            if let Some(children) = maps.get(dir_map[id as usize] as usize) {
                stack.extend(children.values().rev().copied());
            }
        }

        // Unreachable nodes go after the reachable ones, to be cut off.
        let mut next_unreachable = reachable;
        let mut target: Vec<NodeId> = new_id
            .iter()
            .map(|&id| match id {
                NO_MAP => {
                    next_unreachable += 1;
                    next_unreachable - 1
                }
                id => id,
            })
            .collect();

        // Move every node to its new position in place; each swap puts one
        // node where it belongs, so no second node vector is needed.
        for position in 0..nodes.len() {
            while target[position] as usize != position {
                let destination = target[position] as usize;
                nodes.swap(position, destination);
                dir_map.swap(position, destination);
                target.swap(position, destination);
            }
        }
        drop(target);
        nodes.truncate(reachable as usize);
        nodes.shrink_to_fit();

        // Pack each directory's children, freeing its map.
        for (node, &map) in nodes.iter_mut().zip(&dir_map) {
            let Some(children) = maps.get_mut(map as usize).map(std::mem::take) else {
                continue;
            };
            let pairs = children.iter().filter_map(|(name, child)| {
                let id = new_id[*child as usize];
                (id != NO_MAP).then_some((name.as_slice(), id))
            });
            // A map yields its names in increasing order.
            node.kind = NodeKind::Dir {
                children: Children::from_sorted(pairs).unwrap_or_default(),
            };
        }
        Tree { nodes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::FileData;

    fn path(text: &str) -> EntryPath {
        EntryPath::from_components(text.split('/').filter(|part| !part.is_empty()))
    }

    fn meta(mode: u16) -> Metadata {
        Metadata {
            mode,
            mtime: 1_700_000_000,
            ..Metadata::default()
        }
    }

    fn dir(name: &str, mode: u16) -> LayerEntry {
        LayerEntry {
            path: path(name),
            kind: EntryKind::Dir,
            meta: meta(mode),
        }
    }

    fn file(name: &str, data_offset: u64) -> LayerEntry {
        LayerEntry {
            path: path(name),
            kind: EntryKind::Reg {
                data: FileData {
                    layer: 0,
                    data_offset,
                    size: 1,
                },
            },
            meta: meta(0o644),
        }
    }

    fn symlink(name: &str, target: &str) -> LayerEntry {
        LayerEntry {
            path: path(name),
            kind: EntryKind::Symlink {
                target: target.as_bytes().to_vec(),
            },
            meta: meta(0o777),
        }
    }

    fn hardlink(name: &str, target: &str) -> LayerEntry {
        LayerEntry {
            path: path(name),
            kind: EntryKind::Hardlink {
                target: path(target),
            },
            meta: meta(0o600),
        }
    }

    /// Lists the tree as `path kind` lines in depth-first order; files show
    /// their data offset and node id so shared nodes are visible.
    fn render(tree: &Tree) -> Vec<String> {
        let mut lines = Vec::new();
        let mut stack = vec![(String::new(), ROOT)];
        while let Some((prefix, id)) = stack.pop() {
            let node = tree.node(id);
            let shown = if prefix.is_empty() {
                "/"
            } else {
                prefix.as_str()
            };
            match &node.kind {
                NodeKind::Dir { children } => {
                    lines.push(format!("{shown} dir {:o}", node.meta.mode));
                    for (name, child) in children.iter().rev() {
                        stack.push((format!("{prefix}/{}", String::from_utf8_lossy(name)), child));
                    }
                }
                NodeKind::Reg { data } => {
                    lines.push(format!("{shown} reg @{} #{id}", data.data_offset))
                }
                NodeKind::Symlink { target } => {
                    lines.push(format!("{shown} -> {}", String::from_utf8_lossy(target)))
                }
                other => lines.push(format!("{shown} {other:?}")),
            }
        }
        lines
    }

    /// Checks the invariants documented on [`Tree`].
    fn check_invariants(tree: &Tree) {
        let mut seen = vec![0usize; tree.nodes.len()];
        seen[ROOT as usize] = 1;
        for node in &tree.nodes {
            if let NodeKind::Dir { children } = &node.kind {
                for (name, child) in children {
                    assert!(!name.is_empty());
                    assert!(name.len() <= 255);
                    assert!(!name.contains(&b'/'));
                    assert!(!name.contains(&0));
                    assert!(name != b".");
                    assert!(name != b"..");
                    seen[child as usize] += 1;
                }
            }
        }
        for (id, count) in seen.iter().enumerate() {
            assert!(*count >= 1, "node {id} is unreachable");
            if *count > 1 {
                assert!(
                    !matches!(tree.nodes[id].kind, NodeKind::Dir { .. }),
                    "directory {id} has several names"
                );
            }
        }
    }

    fn merged(layers: Vec<Vec<LayerEntry>>) -> Vec<String> {
        let tree = merge(&layers).unwrap();
        check_invariants(&tree);
        render(&tree)
    }

    #[test]
    fn merge_rules() {
        type Case<'a> = (&'a str, Vec<Vec<LayerEntry>>, Vec<&'a str>);
        let cases: Vec<Case> = vec![
            (
                "implied parents",
                vec![vec![file("a/b/c", 0)]],
                vec![
                    "/ dir 755",
                    "/a dir 755",
                    "/a/b dir 755",
                    "/a/b/c reg @0 #3",
                ],
            ),
            (
                "later entry wins in one layer",
                vec![vec![file("f", 0), file("f", 1)]],
                vec!["/ dir 755", "/f reg @1 #1"],
            ),
            (
                "upper layer replaces file",
                vec![vec![file("f", 0)], vec![file("f", 5)]],
                vec!["/ dir 755", "/f reg @5 #1"],
            ),
            (
                "non-dir replaces dir and its subtree",
                vec![
                    vec![dir("d", 0o700), file("d/x", 0)],
                    vec![symlink("d", "etc")],
                ],
                vec!["/ dir 755", "/d -> etc"],
            ),
            (
                "dir over dir keeps children",
                vec![vec![dir("d", 0o700), file("d/x", 0)], vec![dir("d", 0o750)]],
                vec!["/ dir 755", "/d dir 750", "/d/x reg @0 #2"],
            ),
            (
                "dir replaces file",
                vec![vec![file("d", 0)], vec![dir("d", 0o711), file("d/y", 3)]],
                vec!["/ dir 755", "/d dir 711", "/d/y reg @3 #2"],
            ),
            (
                "whiteout removes lower file",
                vec![vec![file("a", 0), file("b", 1)], vec![file(".wh.a", 0)]],
                vec!["/ dir 755", "/b reg @1 #1"],
            ),
            (
                "whiteout removes lower dir",
                vec![vec![file("d/x/y", 0)], vec![file(".wh.d", 0)]],
                vec!["/ dir 755"],
            ),
            (
                "whiteout keeps same layer entry after it",
                vec![vec![file("a", 0)], vec![file(".wh.a", 0), file("a", 7)]],
                vec!["/ dir 755", "/a reg @7 #1"],
            ),
            (
                "whiteout keeps same layer entry before it",
                vec![vec![file("a", 0)], vec![file("a", 7), file(".wh.a", 0)]],
                vec!["/ dir 755", "/a reg @7 #1"],
            ),
            (
                "whiteout in first layer removes nothing",
                vec![vec![file("a", 0), file(".wh.a", 0)]],
                vec!["/ dir 755", "/a reg @0 #1"],
            ),
            (
                "whiteout of missing name",
                vec![vec![file("a", 0)], vec![file("x/.wh.never", 0)]],
                vec!["/ dir 755", "/a reg @0 #1", "/x dir 755"],
            ),
            (
                "readd after whiteout",
                vec![
                    vec![file("a", 0)],
                    vec![file(".wh.a", 0)],
                    vec![file("a", 9)],
                ],
                vec!["/ dir 755", "/a reg @9 #1"],
            ),
            (
                "opaque hides lower children only",
                vec![
                    vec![dir("o", 0o755), file("o/a", 0), file("o/sub/c", 1)],
                    vec![dir("o", 0o700), file("o/new", 2), file("o/.wh..wh..opq", 0)],
                ],
                vec!["/ dir 755", "/o dir 700", "/o/new reg @2 #2"],
            ),
            (
                "opaque without dir entry",
                vec![vec![file("o/a", 0)], vec![file("o/.wh..wh..opq", 0)]],
                vec!["/ dir 755", "/o dir 755"],
            ),
            (
                "odd whiteout names ignored",
                vec![
                    vec![file("d/a", 0)],
                    vec![
                        file("d/.wh.", 0),
                        file("d/.wh..", 0),
                        file("d/.wh..wh.plnk", 0),
                    ],
                ],
                vec!["/ dir 755", "/d dir 755", "/d/a reg @0 #2"],
            ),
            (
                "entries below whiteout names skipped",
                vec![vec![file(".wh..wh.plnk/123", 0), file("a", 1)]],
                vec!["/ dir 755", "/a reg @1 #1"],
            ),
            (
                "hard link shares node",
                vec![vec![file("l/orig", 0), hardlink("l/alias", "l/orig")]],
                vec![
                    "/ dir 755",
                    "/l dir 755",
                    "/l/alias reg @0 #2",
                    "/l/orig reg @0 #2",
                ],
            ),
            (
                "hard link survives target whiteout",
                vec![
                    vec![file("l/orig", 0), hardlink("l/alias", "l/orig")],
                    vec![file("l/.wh.orig", 0)],
                ],
                vec!["/ dir 755", "/l dir 755", "/l/alias reg @0 #2"],
            ),
            (
                "hard link keeps old target after replace",
                vec![vec![file("a", 0), hardlink("b", "a"), file("a", 4)]],
                vec!["/ dir 755", "/a reg @4 #1", "/b reg @0 #2"],
            ),
            (
                "hard link to symlink",
                vec![vec![symlink("s", "t"), hardlink("h", "s")]],
                vec!["/ dir 755", "/h -> t", "/s -> t"],
            ),
            (
                "file parent replaced by implied dir",
                vec![vec![file("p", 0)], vec![file("p/child", 1)]],
                vec!["/ dir 755", "/p dir 755", "/p/child reg @1 #2"],
            ),
            (
                "root entry updates root",
                vec![vec![dir("", 0o700), file("a", 0)], vec![dir("/", 0o751)]],
                vec!["/ dir 751", "/a reg @0 #1"],
            ),
        ];
        for (case, layers, expected) in cases {
            assert_eq!(merged(layers), expected, "case {case}");
        }
    }

    #[test]
    fn merge_hard_link_metadata_is_target() {
        let layers = vec![vec![file("a", 0), hardlink("b", "a")]];
        let tree = merge(&layers).unwrap();
        assert_eq!(tree.node(1).meta.mode, 0o644);
        assert_eq!(tree.nodes.len(), 2);
    }

    #[test]
    fn merge_errors() {
        let cases: Vec<(&str, Vec<Vec<LayerEntry>>, &str)> = vec![
            (
                "missing target",
                vec![vec![hardlink("b", "nope")]],
                "missing target \"/nope\"",
            ),
            (
                "target whited out in same layer",
                vec![
                    vec![file("a", 0)],
                    vec![file(".wh.a", 0), hardlink("b", "a")],
                ],
                "missing target",
            ),
            (
                "directory target",
                vec![vec![dir("d", 0o755), hardlink("b", "d")]],
                "names directory",
            ),
            (
                "root not dir",
                vec![vec![LayerEntry {
                    path: EntryPath::default(),
                    kind: EntryKind::Fifo,
                    meta: meta(0),
                }]],
                "the root entry is a fifo",
            ),
            (
                "dot dot component",
                vec![vec![LayerEntry {
                    path: EntryPath::from_components([b".."]),
                    kind: EntryKind::Dir,
                    meta: meta(0),
                }]],
                "invalid name component",
            ),
        ];
        for (case, layers, message) in cases {
            let error = merge(&layers).expect_err(case);
            assert!(error.to_string().contains(message), "case {case}: {error}");
        }
    }

    #[test]
    fn merge_ids_are_deterministic() {
        let layers = vec![
            vec![file("z", 0), file("a/b", 1), file("m", 2)],
            vec![file(".wh.m", 0), file("a/c", 3)],
        ];
        let first = merge(&layers).unwrap();
        let second = merge(&layers).unwrap();
        assert_eq!(first, second);
        assert_eq!(
            render(&first),
            vec![
                "/ dir 755",
                "/a dir 755",
                "/a/b reg @1 #2",
                "/a/c reg @3 #3",
                "/z reg @0 #4"
            ]
        );
        check_invariants(&first);
    }
}
