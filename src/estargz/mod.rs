//! eStargz layers: footer, TOC and the layer index built from it, per the
//! eStargz spec (containerd/stargz-snapshotter docs/estargz.md).
//!
//! Reading a layer lazily takes three steps. [`parse_footer`] finds the TOC
//! offset in the last 51 bytes of the blob. [`read_toc_index`] gunzips the
//! TOC member and parses `stargz.index.json` as it streams out into a
//! [`crate::layer::LayerIndex`] ([`extract_toc_json`] and [`build_index`]
//! do the same in two steps, holding the JSON), whose entries feed
//! [`crate::tree::merge`] and whose chunks map the layer's data space to
//! gzip members of the blob.

mod footer;
mod index;
pub mod name;
mod rfc3339;
mod toc;

pub use footer::{
    parse_footer, Footer, FooterError, FooterFormatError, FOOTER_SIZE, LEGACY_FOOTER_SIZE,
};
pub use index::{
    build_index, read_toc_index, StreamedIndex, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK,
};
pub use rfc3339::{parse_rfc3339, TimestampError};
pub use toc::{
    extract_toc_json, TocError, TocLimits, DEFAULT_MAX_TOC_SIZE, TOC_TAR_NAME, TOC_VERSION,
};
