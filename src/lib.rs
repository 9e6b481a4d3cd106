//! esgz-nbd: container images with eStargz layers served as lazily fetched
//! ext4 block devices over NBD.

pub mod cli;
pub mod device;
pub mod disk;
pub mod estargz;
pub mod export;
pub mod ext4;
pub mod image;
pub mod layer;
pub mod nbd;
pub mod oci_layout;
pub mod prefetch;
pub mod reference;
pub mod registry;
pub mod source;
pub mod store;
pub mod tarlayer;
pub mod tree;
