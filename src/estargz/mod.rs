//! Placeholder, replaced by the estargz implementation.
