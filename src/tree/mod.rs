//! The merged filesystem tree that the ext4 layout renders, and the per-layer
//! entries it is merged from.
//!
//! A layer (an eStargz TOC or a plain tar) is first normalised into a list of
//! [`LayerEntry`] values; [`merge`] applies the layers in order with the OCI
//! whiteout rules and produces one [`Tree`].

pub mod merge;

use std::collections::BTreeMap;

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
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
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
        children: BTreeMap<Vec<u8>, NodeId>,
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
    /// A hard link to another path of the same layer (normalised components).
    Hardlink {
        target: Vec<Vec<u8>>,
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
/// `path` holds the components below the root (empty for the root itself);
/// whiteout names (`.wh.NAME`, `.wh..wh..opq`) are kept as they are and
/// interpreted by [`merge`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerEntry {
    pub path: Vec<Vec<u8>>,
    pub kind: EntryKind,
    pub meta: Metadata,
}
