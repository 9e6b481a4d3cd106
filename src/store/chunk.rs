//! Chunk decoding: gunzip of an eStargz gzip member (RFC 1952) up to the bytes its chunks
//! need, and sha256 verification of each chunk against its TOC `chunkDigest`.

use std::io::{self, Read};

use bytes::Bytes;
use flate2::read::MultiGzDecoder;
use sha2::{Digest, Sha256};

/// Decompresses the first `decoded_len` bytes of the gzip stream in `member`.
///
/// An eStargz member contains a chunk's bytes followed by tar padding and the next entry's
/// headers, so decoding stops after `decoded_len` bytes. The gzip trailer's CRC is then
/// never reached, so the chunk digests are the integrity check. A multi-member decoder is
/// used because the range may end after more than one gzip member.
pub fn decode_member(member: &[u8], decoded_len: u64) -> io::Result<Vec<u8>> {
    let capacity = usize::try_from(decoded_len).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("decoded length {decoded_len} does not fit in memory"),
        )
    })?;
    let mut output = Vec::new();
    output.try_reserve_exact(capacity).map_err(|error| {
        io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!("cannot allocate {decoded_len} bytes: {error}"),
        )
    })?;

    MultiGzDecoder::new(member)
        .take(decoded_len)
        .read_to_end(&mut output)?;
    if output.len() != capacity {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "the gzip stream ends after {} of the {decoded_len} bytes the chunks need",
                output.len()
            ),
        ));
    }
    Ok(output)
}

/// sha256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// One chunk to cut out of a decoded member.
#[derive(Clone, Debug)]
pub(crate) struct ChunkSlice {
    /// Index of the chunk in the layer's chunk table.
    pub(crate) chunk: usize,
    pub(crate) inner_offset: u64,
    pub(crate) size: u64,
    pub(crate) digest: Option<[u8; 32]>,
}

/// The result for one chunk of a decoded member.
#[derive(Debug)]
pub(crate) enum ChunkOutcome {
    /// The chunk's bytes, verified, or accepted without a check when verification is off
    /// or the TOC has no digest.
    Ready { chunk: usize, bytes: Bytes },
    Mismatch {
        chunk: usize,
        expected: [u8; 32],
        actual: [u8; 32],
    },
}

/// Decodes `member` and cuts out (and, with `verify`, checks) every chunk in `slices`.
pub(crate) fn decode_chunks(
    member: &[u8],
    slices: &[ChunkSlice],
    verify: bool,
) -> io::Result<Vec<ChunkOutcome>> {
    let mut decoded_len = 0u64;
    for slice in slices {
        let end = slice.inner_offset.checked_add(slice.size).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("chunk {} ends past 2^64", slice.chunk),
            )
        })?;
        decoded_len = decoded_len.max(end);
    }
    let decoded = Bytes::from(decode_member(member, decoded_len)?);

    let outcomes = slices
        .iter()
        .map(|slice| {
            // Both bounds are at most `decoded_len`, which fits in usize: decode_member checked it.
            let start = slice.inner_offset as usize;
            let bytes = decoded.slice(start..start + slice.size as usize);
            match slice.digest {
                Some(expected) if verify => {
                    let actual = sha256(&bytes);
                    if actual == expected {
                        ChunkOutcome::Ready {
                            chunk: slice.chunk,
                            bytes,
                        }
                    } else {
                        ChunkOutcome::Mismatch {
                            chunk: slice.chunk,
                            expected,
                            actual,
                        }
                    }
                }
                _ => ChunkOutcome::Ready {
                    chunk: slice.chunk,
                    bytes,
                },
            }
        })
        .collect();
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::write::GzEncoder;
    use flate2::Compression;

    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(data).expect("write to a Vec");
        encoder.finish().expect("finish a Vec")
    }

    #[test]
    fn decode_member_lengths() {
        let member = gzip(b"0123456789abcdef");
        let cases: &[(u64, Option<&[u8]>)] = &[
            (0, Some(b"")),
            (4, Some(b"0123")),
            (16, Some(b"0123456789abcdef")),
            (17, None),
            (u64::MAX, None),
        ];
        for (len, expected) in cases {
            let result = decode_member(&member, *len);
            match expected {
                Some(bytes) => assert_eq!(result.expect("decodes").as_slice(), *bytes, "len {len}"),
                None => assert!(result.is_err(), "len {len} must fail"),
            }
        }
    }

    #[test]
    fn decode_member_spans_two_members() {
        let mut stream = gzip(b"first");
        stream.extend(gzip(b"second"));
        assert_eq!(decode_member(&stream, 11).expect("decodes"), b"firstsecond");
    }

    #[test]
    fn decode_member_rejects_garbage() {
        assert!(decode_member(b"not gzip at all", 3).is_err());
    }

    #[test]
    fn decode_chunks_verifies_each_chunk() {
        let member = gzip(b"aaaabbbbcccc");
        let slices = [
            ChunkSlice {
                chunk: 0,
                inner_offset: 0,
                size: 4,
                digest: Some(sha256(b"aaaa")),
            },
            ChunkSlice {
                chunk: 1,
                inner_offset: 8,
                size: 4,
                digest: Some(sha256(b"wrong")),
            },
            ChunkSlice {
                chunk: 2,
                inner_offset: 4,
                size: 4,
                digest: None,
            },
        ];

        let outcomes = decode_chunks(&member, &slices, true).expect("decodes");
        assert!(
            matches!(&outcomes[0], ChunkOutcome::Ready { chunk: 0, bytes } if bytes.as_ref() == b"aaaa")
        );
        assert!(
            matches!(&outcomes[1], ChunkOutcome::Mismatch { chunk: 1, actual, .. } if *actual == sha256(b"cccc"))
        );
        assert!(
            matches!(&outcomes[2], ChunkOutcome::Ready { chunk: 2, bytes } if bytes.as_ref() == b"bbbb")
        );

        let unverified = decode_chunks(&member, &slices, false).expect("decodes");
        assert!(
            matches!(&unverified[1], ChunkOutcome::Ready { chunk: 1, bytes } if bytes.as_ref() == b"cccc")
        );
    }
}
