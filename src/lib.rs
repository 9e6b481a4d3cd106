//! esgz-nbd: container images with eStargz layers served as lazily fetched
//! ext4 block devices over NBD.

pub mod access;
pub mod attach;
pub mod buffers;
pub mod cli;
pub mod config;
pub mod convert;
pub mod device;
pub mod disk;
pub mod estargz;
pub mod export;
pub mod ext4;
pub mod heap;
pub mod image;
pub mod inspect;
pub mod layer;
pub mod man;
pub mod metrics;
pub mod nbd;
pub mod oci_dir;
pub mod oci_layout;
pub mod overlay;
pub mod pax;
pub mod prefetch;
pub mod progress;
pub mod reference;
pub mod registry;
pub mod source;
pub mod stats_file;
pub mod store;
pub mod tarlayer;
pub mod tree;
pub mod whole_dir;
pub mod writer;
