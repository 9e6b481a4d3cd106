//! The merged filesystem tree that the ext4 layout renders, and the per-layer
//! entries it is merged from.
//!
//! A layer (an eStargz TOC or a plain tar) is first normalised into a list of
//! [`LayerEntry`] values; [`merge`] applies the layers in order with the OCI
//! whiteout rules and produces one [`Tree`].

pub mod merge;

pub use merge::{merge, merge_owned, MergeError};

/// Index of a node in [`Tree::nodes`].
pub type NodeId = u32;

/// The root directory is always node 0.
pub const ROOT: NodeId = 0;

/// Inode metadata shared by every node type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    /// Modification time in seconds since the Unix epoch; may be negative.
    pub mtime: i64,
    /// Nanoseconds within `mtime`, below 1e9.
    pub mtime_nsec: u32,
    /// Extended attributes, sorted by full name (`user.comment`,
    /// `security.capability`), values as raw bytes.
    pub xattrs: Xattrs,
}

/// The extended attributes of a node as `(full name, value)` pairs: a
/// list that takes one pointer when it is empty, as it is for most files,
/// which keeps [`Metadata`] at 32 bytes.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Xattrs {
    list: Option<Box<XattrList>>,
}

#[derive(Clone, PartialEq, Eq)]
struct XattrList {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl From<Vec<(Vec<u8>, Vec<u8>)>> for Xattrs {
    fn from(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Xattrs {
        Xattrs {
            list: (!pairs.is_empty()).then(|| Box::new(XattrList { pairs })),
        }
    }
}

impl std::ops::Deref for Xattrs {
    type Target = [(Vec<u8>, Vec<u8>)];

    fn deref(&self) -> &Self::Target {
        self.list.as_ref().map_or(&[], |list| &list.pairs)
    }
}

impl<'a> IntoIterator for &'a Xattrs {
    type Item = &'a (Vec<u8>, Vec<u8>);
    type IntoIter = std::slice::Iter<'a, (Vec<u8>, Vec<u8>)>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl PartialEq<Vec<(Vec<u8>, Vec<u8>)>> for Xattrs {
    fn eq(&self, other: &Vec<(Vec<u8>, Vec<u8>)>) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for Xattrs {
    fn fmt(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, formatter)
    }
}

/// Where a regular file's bytes live: a contiguous range of one layer's
/// data space.
///
/// A layer's data space is the concatenation of the contents of its regular
/// files (hard links counted once) in the order the layer lists them, so
/// `data_offset..data_offset + size` is unique within the layer and a file's
/// bytes are found through the layer's chunk table (see
/// [`crate::layer::LayerIndex`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileData {
    /// Index of the layer in the image, 0 = lowest.
    pub layer: u32,
    /// Start of the file in the layer's data space.
    pub data_offset: u64,
    /// File size in bytes.
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory; children sorted by name bytes.
    Dir {
        children: Children,
    },
    Reg {
        data: FileData,
    },
    Symlink {
        target: Vec<u8>,
    },
    CharDev {
        major: u32,
        minor: u32,
    },
    BlockDev {
        major: u32,
        minor: u32,
    },
    Fifo,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: NodeKind,
    pub meta: Metadata,
}

/// The entries of a directory, sorted by name bytes, with distinct names.
///
/// All names of a directory sit in one byte buffer, so a tree of a million
/// entries in ten thousand directories contains ten thousand buffers instead
/// of a million names, and an empty directory allocates nothing. Built in one go with [`FromIterator`]
/// (see [`Children::from_sorted`] for input already in order); [`insert`]
/// rebuilds the whole list and suits small trees only.
///
/// [`insert`]: Children::insert
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Children {
    list: Option<Box<ChildList>>,
}

#[derive(Clone, PartialEq, Eq)]
struct ChildList {
    /// The names one after the other.
    names: Box<[u8]>,
    /// For each child in name order: where its name ends in `names`, and its node.
    entries: Box<[(u32, NodeId)]>,
}

impl Children {
    pub fn new() -> Children {
        Children::default()
    }

    /// Builds the list from `(name, node)` pairs in strictly increasing name
    /// order; `None` when they are not, or when the names exceed 4 GiB.
    pub fn from_sorted<'a>(
        pairs: impl IntoIterator<Item = (&'a [u8], NodeId)>,
    ) -> Option<Children> {
        let mut names = Vec::new();
        let mut entries = Vec::new();
        let mut previous: Option<&[u8]> = None;
        for (name, node) in pairs {
            if previous.is_some_and(|previous| previous >= name) {
                return None;
            }
            previous = Some(name);
            names.extend_from_slice(name);
            entries.push((u32::try_from(names.len()).ok()?, node));
        }
        if entries.is_empty() {
            return Some(Children::default());
        }
        Some(Children {
            list: Some(Box::new(ChildList {
                names: names.into_boxed_slice(),
                entries: entries.into_boxed_slice(),
            })),
        })
    }

    pub fn len(&self) -> usize {
        self.list.as_ref().map_or(0, |list| list.entries.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns the child at position `index` in name order.
    pub fn at(&self, index: usize) -> Option<(&[u8], NodeId)> {
        let list = self.list.as_ref()?;
        let &(end, node) = list.entries.get(index)?;
        let start = match index {
            0 => 0,
            _ => list.entries.get(index - 1).map_or(0, |&(end, _)| end),
        };
        let name = list.names.get(start as usize..end as usize)?;
        Some((name, node))
    }

    /// Returns the node named `name`.
    pub fn get(&self, name: &[u8]) -> Option<NodeId> {
        let (mut low, mut high) = (0, self.len());
        while low < high {
            let middle = low + (high - low) / 2;
            let (found, node) = self.at(middle)?;
            match found.cmp(name) {
                std::cmp::Ordering::Less => low = middle + 1,
                std::cmp::Ordering::Greater => high = middle,
                std::cmp::Ordering::Equal => return Some(node),
            }
        }
        None
    }

    /// Iterates over the children in name order.
    pub fn iter(&self) -> ChildIter<'_> {
        ChildIter {
            children: self,
            front: 0,
            back: self.len(),
        }
    }

    /// Adds or replaces the child `name`, rebuilding the list.
    pub fn insert(&mut self, name: &[u8], node: NodeId) {
        let mut pairs: Vec<(&[u8], NodeId)> = self
            .iter()
            .filter(|(existing, _)| *existing != name)
            .collect();
        let position = pairs.partition_point(|(existing, _)| *existing < name);
        pairs.insert(position, (name, node));
        let names: Vec<(Vec<u8>, NodeId)> = pairs
            .into_iter()
            .map(|(name, node)| (name.to_vec(), node))
            .collect();
        *self = names.into_iter().collect();
    }
}

impl<N: AsRef<[u8]>> FromIterator<(N, NodeId)> for Children {
    /// Sorts the pairs by name; of pairs with equal names the last one stays.
    fn from_iter<I: IntoIterator<Item = (N, NodeId)>>(pairs: I) -> Children {
        let mut pairs: Vec<(N, NodeId)> = pairs.into_iter().collect();
        pairs.reverse();
        pairs.sort_by(|a, b| a.0.as_ref().cmp(b.0.as_ref()));
        pairs.dedup_by(|later, earlier| later.0.as_ref() == earlier.0.as_ref());
        Children::from_sorted(pairs.iter().map(|(name, node)| (name.as_ref(), *node)))
            .unwrap_or_default()
    }
}

impl std::fmt::Debug for Children {
    fn fmt(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter
            .debug_map()
            .entries(
                self.iter()
                    .map(|(name, node)| (String::from_utf8_lossy(name), node)),
            )
            .finish()
    }
}

/// Iterator over [`Children`] in name order (or reversed with `rev`).
pub struct ChildIter<'a> {
    children: &'a Children,
    front: usize,
    back: usize,
}

impl<'a> Iterator for ChildIter<'a> {
    type Item = (&'a [u8], NodeId);

    fn next(&mut self) -> Option<Self::Item> {
        if self.front >= self.back {
            return None;
        }
        self.front += 1;
        self.children.at(self.front - 1)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.back - self.front;
        (left, Some(left))
    }
}

impl DoubleEndedIterator for ChildIter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        if self.front >= self.back {
            return None;
        }
        self.back -= 1;
        self.children.at(self.back)
    }
}

impl ExactSizeIterator for ChildIter<'_> {}

impl<'a> IntoIterator for &'a Children {
    type Item = (&'a [u8], NodeId);
    type IntoIter = ChildIter<'a>;

    fn into_iter(self) -> ChildIter<'a> {
        self.iter()
    }
}

/// A merged filesystem tree.
///
/// Invariants kept by [`merge`]: `nodes[ROOT]` is a directory; every node is
/// reachable from the root; a node referenced from several directory entries
/// is a hard-linked regular file (or another non-directory), never a
/// directory; names are non-empty, at most 255 bytes, contain no `/` or NUL
/// and are neither `.` nor `..`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

impl Tree {
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }
}

/// A normalised path below the root: its components joined by `/`, in one
/// allocation. The root is the empty path.
///
/// Components never contain `/` when they come from
/// [`crate::estargz::name::normalize_name`]; a component given to
/// [`EntryPath::from_components`] that does contain one reads back as
/// several, and an empty component reads back as empty (but a path of one
/// empty component is the root).
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct EntryPath {
    joined: Box<[u8]>,
}

impl EntryPath {
    pub fn from_components<C: AsRef<[u8]>>(components: impl IntoIterator<Item = C>) -> EntryPath {
        let mut joined = Vec::new();
        for (position, component) in components.into_iter().enumerate() {
            if position > 0 {
                joined.push(b'/');
            }
            joined.extend_from_slice(component.as_ref());
        }
        EntryPath {
            joined: joined.into_boxed_slice(),
        }
    }

    /// The components, first to last; none for the root.
    pub fn components(&self) -> impl DoubleEndedIterator<Item = &[u8]> + Clone {
        components_of(&self.joined)
    }

    pub fn is_root(&self) -> bool {
        self.joined.is_empty()
    }

    /// Number of components.
    pub fn component_count(&self) -> usize {
        self.components().count()
    }

    /// The components joined by `/`.
    pub fn as_bytes(&self) -> &[u8] {
        &self.joined
    }

    /// The last component and the parent path (joined by `/`); `None` for the root.
    pub fn split_last(&self) -> Option<(&[u8], &[u8])> {
        if self.is_root() {
            return None;
        }
        Some(match self.joined.iter().rposition(|&byte| byte == b'/') {
            Some(slash) => (&self.joined[slash + 1..], &self.joined[..slash]),
            None => (&self.joined, &[]),
        })
    }

    /// The only component of a path directly below the root.
    pub fn single(&self) -> Option<&[u8]> {
        match self.split_last() {
            Some((name, [])) => Some(name),
            _ => None,
        }
    }

    /// The path as an absolute path for messages and logs.
    pub fn display(&self) -> String {
        display_joined(&self.joined)
    }
}

/// The components of a path joined by `/` (see [`EntryPath`]); none for the
/// empty path.
pub fn components_of(joined: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> + Clone {
    let all = (!joined.is_empty()).then_some(joined);
    all.into_iter()
        .flat_map(|joined| joined.split(|&byte| byte == b'/'))
}

/// A path joined by `/` as an absolute path for messages and logs.
pub fn display_joined(joined: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(joined))
}

impl From<Vec<Vec<u8>>> for EntryPath {
    fn from(components: Vec<Vec<u8>>) -> EntryPath {
        EntryPath::from_components(components)
    }
}

impl PartialEq<Vec<Vec<u8>>> for EntryPath {
    fn eq(&self, other: &Vec<Vec<u8>>) -> bool {
        self.components()
            .eq(other.iter().map(|component| component.as_slice()))
    }
}

impl std::fmt::Debug for EntryPath {
    fn fmt(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.display(), formatter)
    }
}

/// Type of one layer entry, with its type-specific data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    Reg {
        data: FileData,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// A hard link to another path of the same layer.
    Hardlink {
        target: EntryPath,
    },
    CharDev {
        major: u32,
        minor: u32,
    },
    BlockDev {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// One entry of a layer after name normalisation, in layer order.
///
/// `path` is the path below the root (the empty path for the root itself);
/// whiteout names (`.wh.NAME`, `.wh..wh..opq`) are kept as they are and
/// interpreted by [`merge`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerEntry {
    pub path: EntryPath,
    pub kind: EntryKind,
    pub meta: Metadata,
}
