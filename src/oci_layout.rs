//! Placeholder, replaced by the oci_layout implementation.
