//! Placeholder, replaced by the tarlayer implementation.
