//! Fuzz harnesses for the parsers that read untrusted input: the eStargz
//! footer, TOC JSON, tar headers, registry manifests, the NBD wire protocol
//! and the ext4 layout of arbitrary TOCs. Each function must return for any
//! input without a panic; errors are expected.
//!
//! The cargo-fuzz targets in `fuzz_targets/` call these functions, and the
//! crate's `tests/fault_fuzz_props.rs` runs them on proptest inputs and the
//! fixtures in `cargo test`.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use esgz_nbd::device::BlockDevice;
use esgz_nbd::estargz::{build_index, parse_footer, TocLimits};
use esgz_nbd::ext4::{Layout, LayoutOptions, SegmentKind, BLOCK_SIZE};
use esgz_nbd::nbd::{serve_connection, ServerOptions};
use esgz_nbd::registry::manifest::{parse_manifest, select_platform, Manifest};
use esgz_nbd::source::Platform;
use esgz_nbd::tarlayer::index_tar;
use esgz_nbd::tree::merge::merge;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A digest that passes validation, for the functions that need one.
pub const DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// TOC limits small enough that one input stays fast.
pub fn small_limits() -> TocLimits {
    TocLimits {
        max_entries: 10_000,
        max_toc_bytes: 1 << 20,
    }
}

/// Largest image whose metadata the ext4 harness renders, in blocks.
const MAX_RENDERED_BLOCKS: u64 = 1 << 16;

/// Parses a footer: the first 8 bytes give the blob size, the rest is the tail.
pub fn footer(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let (size, tail) = data.split_at(8);
    let blob_size = u64::from_le_bytes(size.try_into().unwrap_or_default());
    let _ = parse_footer(tail, blob_size);
    // The well-formed call shape: tail length matching the blob size.
    let _ = parse_footer(tail, tail.len() as u64);
}

/// Builds a layer index from TOC JSON; the first 8 bytes give the TOC offset.
pub fn toc_index(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let (offset, json) = data.split_at(8);
    let toc_offset = u64::from_le_bytes(offset.try_into().unwrap_or_default());
    let _ = build_index(0, DIGEST, json, toc_offset, &small_limits());
}

/// Indexes a tar stream as a plain layer would be.
pub fn tar_index(data: &[u8]) {
    let mut written = 0u64;
    let mut sink = |_offset: u64, bytes: &[u8]| -> io::Result<()> {
        written += bytes.len() as u64;
        Ok(())
    };
    let _ = index_tar(0, DIGEST, data, &mut sink);
}

/// Parses a manifest or index with each content type, and selects a platform
/// from an index.
pub fn manifest(data: &[u8]) {
    let content_types = [
        None,
        Some("application/vnd.oci.image.manifest.v1+json"),
        Some("application/vnd.oci.image.index.v1+json"),
        Some("application/vnd.docker.distribution.manifest.v2+json"),
        Some("application/vnd.docker.distribution.manifest.list.v2+json"),
        Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
    ];
    for content_type in content_types {
        if let Ok(Manifest::Index(index)) = parse_manifest("fuzz input", data, content_type) {
            for text in ["linux/amd64", "linux/arm64/v8", "linux/arm/v7"] {
                if let Ok(platform) = Platform::parse(text) {
                    let _ = select_platform("fuzz input", &index.manifests, &platform);
                }
            }
        }
    }
}

/// A 1 MiB device of zeros, except that reads past 512 KiB fail.
struct FuzzDevice;

impl BlockDevice for FuzzDevice {
    fn size(&self) -> u64 {
        1 << 20
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Bytes> {
        if offset >= 1 << 19 {
            return Err(io::Error::other("fuzz device read error"));
        }
        Ok(Bytes::from(vec![0u8; len as usize]))
    }
}

/// Feeds `data` as a client's bytes (handshake, options, requests) to one
/// server connection, then closes the client side and drains the replies.
pub fn nbd_stream(data: &[u8]) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(runtime) => runtime,
        Err(_) => return,
    };
    runtime.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let options = Arc::new(ServerOptions {
            max_block: 64 * 1024,
            ..ServerOptions::default()
        });
        let connection = tokio::spawn(serve_connection(server, Arc::new(FuzzDevice), options));

        let (mut reader, mut writer) = tokio::io::split(client);
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink).await;
        });
        let _ = writer.write_all(data).await;
        let _ = writer.shutdown().await;
        drop(writer);

        // The server must end on its own once the client's bytes run out.
        let ended = tokio::time::timeout(Duration::from_secs(30), connection).await;
        assert!(
            ended.is_ok(),
            "the NBD connection did not end after the client closed"
        );
        let _ = drain.await;
    });
}

/// Builds a layer index from TOC JSON, merges it into a tree, lays out ext4
/// and renders every metadata block of images up to 256 MiB.
pub fn ext4_layout(data: &[u8]) {
    let Ok(index) = build_index(0, DIGEST, data, u64::MAX / 2, &small_limits()) else {
        return;
    };
    let Ok(tree) = merge(&[index.entries]) else {
        return;
    };
    let Ok(layout) = Layout::new(Arc::new(tree), LayoutOptions::default()) else {
        return;
    };
    render_metadata(&layout);
}

/// Renders every metadata block of a layout of at most
/// `MAX_RENDERED_BLOCKS` blocks; returns the blocks rendered.
pub fn render_metadata(layout: &Layout) -> u64 {
    if layout.block_count() > MAX_RENDERED_BLOCKS {
        return 0;
    }
    let mut block = vec![0u8; BLOCK_SIZE as usize];
    let mut rendered = 0;
    for segment in layout.segments(0, layout.block_count()) {
        if segment.kind != SegmentKind::Metadata {
            continue;
        }
        for number in segment.start_block..segment.start_block + segment.block_count {
            layout.render_metadata(number, &mut block);
            rendered += 1;
        }
    }
    rendered
}
