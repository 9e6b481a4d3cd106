//! Placeholder, replaced by the nbd implementation.
