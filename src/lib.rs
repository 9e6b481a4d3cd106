//! esgz-nbd: container images with eStargz layers served as lazily fetched
//! ext4 block devices over NBD.

pub mod device;
pub mod estargz;
pub mod ext4;
pub mod layer;
pub mod nbd;
pub mod oci_layout;
pub mod reference;
pub mod registry;
pub mod source;
pub mod store;
pub mod tarlayer;
pub mod tree;
pub mod cli;
pub mod disk;
pub mod export;
pub mod image;
pub mod writer;
pub mod convert;
pub mod oci_dir;
