//! OCI layer merge: whiteouts, opaque directories and hard links.

use super::{LayerEntry, Tree};

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("layer {layer}: hard link {path:?} names missing target {target:?}")]
    MissingHardlinkTarget { layer: usize, path: String, target: String },
}

/// Applies `layers` (lowest first) to an empty root and returns the tree.
pub fn merge(layers: &[Vec<LayerEntry>]) -> Result<Tree, MergeError> {
    let _ = layers;
    todo!("merge")
}
