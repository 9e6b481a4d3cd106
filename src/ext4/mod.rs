//! Placeholder, replaced by the ext4 implementation.
