//! Placeholder, replaced by the registry implementation.
