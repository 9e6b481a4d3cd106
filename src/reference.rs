//! Placeholder, replaced by the reference implementation.
