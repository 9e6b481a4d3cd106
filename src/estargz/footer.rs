//! The eStargz footer (an empty gzip member carrying the TOC offset in its
//! extra field), per the eStargz spec in containerd/stargz-snapshotter.

use std::io::Read;

/// Size of the eStargz footer in bytes. It is a 10-byte gzip header, the
/// 2-byte XLEN and the 26-byte extra field (`S`, `G`, a 2-byte subfield
/// length of 22 and the 22-byte payload). The 5-byte empty stored deflate
/// block and the 8-byte CRC32/ISIZE trailer follow.
pub const FOOTER_SIZE: u64 = 51;

/// Size of the legacy stargz footer: as [`FOOTER_SIZE`] but the extra field
/// is the 22-byte payload alone, without the `SG` subfield header.
pub const LEGACY_FOOTER_SIZE: u64 = 47;

/// gzip member magic, ID1 ID2 (RFC 1952 section 2.3.1).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// Compression method 8 = deflate.
const GZIP_CM_DEFLATE: u8 = 8;
/// FLG.FEXTRA: the header has an extra field.
const GZIP_FLAG_FEXTRA: u8 = 0x04;
/// Offset of XLEN in a gzip header with FEXTRA.
const GZIP_XLEN_OFFSET: usize = 10;
/// Start of the extra field.
const GZIP_EXTRA_OFFSET: usize = 12;

/// Subfield id of the eStargz extra field.
const SUBFIELD_ID: [u8; 2] = *b"SG";
/// Footer payload: `%016x` TOC offset followed by this magic.
const PAYLOAD_MAGIC: &[u8; 6] = b"STARGZ";
/// Length of the payload: 16 hex digits plus the magic.
const PAYLOAD_LEN: usize = 16 + PAYLOAD_MAGIC.len();

/// Location of a blob's TOC, read from its footer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Blob offset of the gzip member holding the TOC tar.
    pub toc_offset: u64,
    /// Size of the footer found, [`FOOTER_SIZE`] or [`LEGACY_FOOTER_SIZE`].
    pub footer_size: u64,
}

/// Reason one footer format did not match the tail bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FooterFormatError {
    #[error("gzip magic is {seen:02x?}, expected 1f 8b")]
    Magic { seen: [u8; 2] },

    #[error("gzip compression method is {seen}, expected 8 (deflate)")]
    Method { seen: u8 },

    #[error("gzip flags are {seen:#04x}, expected only FEXTRA (0x04)")]
    Flags { seen: u8 },

    #[error("gzip extra field length is {seen}, expected {expected}")]
    ExtraLength { seen: u16, expected: u16 },

    #[error("extra subfield id is {seen:02x?} ({text:?}), expected \"SG\"")]
    SubfieldId { seen: [u8; 2], text: String },

    #[error("extra subfield length is {seen}, expected 22")]
    SubfieldLength { seen: u16 },

    #[error("payload ends with {seen:?}, expected \"STARGZ\"")]
    PayloadMagic { seen: String },

    #[error("TOC offset {seen:?} is not 16 hexadecimal digits")]
    OffsetDigits { seen: String },

    #[error("the gzip member does not decompress to an empty stream: {reason}")]
    Body { reason: String },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FooterError {
    #[error(
        "footer tail is {len} bytes but the blob is {blob_size} bytes; pass the last \
         min(51, blob size) bytes of the blob"
    )]
    TailLength { len: usize, blob_size: u64 },

    #[error(
        "blob of {blob_size} bytes has no eStargz footer ({estargz}) and no legacy stargz \
         footer ({legacy}), so it is not an eStargz layer"
    )]
    NotFound {
        blob_size: u64,
        estargz: FooterFormatError,
        legacy: FooterFormatError,
    },

    #[error(
        "blob of {blob_size} bytes is shorter than the {min} byte legacy stargz footer, \
         so it is not an eStargz layer"
    )]
    BlobTooShort { blob_size: u64, min: u64 },

    #[error(
        "footer offset past the end: TOC offset {toc_offset:#x} is not below {limit:#x} \
         (blob size {blob_size} minus the {footer_size} byte footer); the blob is corrupt"
    )]
    OffsetPastEnd {
        toc_offset: u64,
        limit: u64,
        blob_size: u64,
        footer_size: u64,
    },
}

/// Finds the TOC offset in the footer of a blob of `blob_size` bytes.
///
/// `tail` is the last `min(51, blob_size)` bytes of the blob. The 51-byte
/// eStargz footer is tried first, then the 47-byte legacy stargz footer.
pub fn parse_footer(tail: &[u8], blob_size: u64) -> Result<Footer, FooterError> {
    let expected_len = blob_size.min(FOOTER_SIZE);
    if tail.len() as u64 != expected_len {
        return Err(FooterError::TailLength {
            len: tail.len(),
            blob_size,
        });
    }
    if blob_size < LEGACY_FOOTER_SIZE {
        return Err(FooterError::BlobTooShort {
            blob_size,
            min: LEGACY_FOOTER_SIZE,
        });
    }

    let estargz_attempt = match tail.len().checked_sub(FOOTER_SIZE as usize) {
        Some(start) => parse_member(&tail[start..], true),
        None => Err(FooterFormatError::Body {
            reason: format!("the blob is shorter than {FOOTER_SIZE} bytes"),
        }),
    };
    let (toc_offset, footer_size) = match estargz_attempt {
        Ok(offset) => (offset, FOOTER_SIZE),
        Err(estargz) => {
            let start = tail.len() - LEGACY_FOOTER_SIZE as usize;
            match parse_member(&tail[start..], false) {
                Ok(offset) => (offset, LEGACY_FOOTER_SIZE),
                Err(legacy) => {
                    return Err(FooterError::NotFound {
                        blob_size,
                        estargz,
                        legacy,
                    })
                }
            }
        }
    };

    let limit = blob_size - footer_size;
    if toc_offset >= limit {
        return Err(FooterError::OffsetPastEnd {
            toc_offset,
            limit,
            blob_size,
            footer_size,
        });
    }
    Ok(Footer {
        toc_offset,
        footer_size,
    })
}

/// Parses one footer gzip member; `with_subfield` selects the eStargz form
/// (extra field = `SG` subfield) over the legacy one (extra field = payload).
fn parse_member(member: &[u8], with_subfield: bool) -> Result<u64, FooterFormatError> {
    let magic = [member[0], member[1]];
    if magic != GZIP_MAGIC {
        return Err(FooterFormatError::Magic { seen: magic });
    }
    if member[2] != GZIP_CM_DEFLATE {
        return Err(FooterFormatError::Method { seen: member[2] });
    }
    if member[3] != GZIP_FLAG_FEXTRA {
        return Err(FooterFormatError::Flags { seen: member[3] });
    }

    let extra_len = if with_subfield {
        4 + PAYLOAD_LEN
    } else {
        PAYLOAD_LEN
    };
    let xlen = u16::from_le_bytes([member[GZIP_XLEN_OFFSET], member[GZIP_XLEN_OFFSET + 1]]);
    if usize::from(xlen) != extra_len {
        return Err(FooterFormatError::ExtraLength {
            seen: xlen,
            expected: extra_len as u16,
        });
    }
    let extra = &member[GZIP_EXTRA_OFFSET..GZIP_EXTRA_OFFSET + extra_len];

    let payload = if with_subfield {
        let id = [extra[0], extra[1]];
        if id != SUBFIELD_ID {
            return Err(FooterFormatError::SubfieldId {
                seen: id,
                text: String::from_utf8_lossy(&id).into_owned(),
            });
        }
        let subfield_len = u16::from_le_bytes([extra[2], extra[3]]);
        if usize::from(subfield_len) != PAYLOAD_LEN {
            return Err(FooterFormatError::SubfieldLength { seen: subfield_len });
        }
        &extra[4..]
    } else {
        extra
    };

    let (digits, magic) = payload.split_at(16);
    if magic != PAYLOAD_MAGIC {
        return Err(FooterFormatError::PayloadMagic {
            seen: String::from_utf8_lossy(magic).into_owned(),
        });
    }
    let offset = parse_hex_offset(digits).ok_or_else(|| FooterFormatError::OffsetDigits {
        seen: String::from_utf8_lossy(digits).into_owned(),
    })?;

    check_empty_member(member)?;
    Ok(offset)
}

fn parse_hex_offset(digits: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(digits).ok()?;
    if !text.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(text, 16).ok()
}

/// Checks that the member is a complete gzip member of empty content (CRC and
/// size verified by the decoder) that ends exactly at the end of the blob.
fn check_empty_member(member: &[u8]) -> Result<(), FooterFormatError> {
    let mut decoder = flate2::bufread::GzDecoder::new(member);
    let mut output = Vec::new();
    if let Err(error) = decoder.by_ref().take(1).read_to_end(&mut output) {
        return Err(FooterFormatError::Body {
            reason: error.to_string(),
        });
    }
    if !output.is_empty() {
        return Err(FooterFormatError::Body {
            reason: "it holds data".to_string(),
        });
    }
    let rest = decoder.into_inner();
    if !rest.is_empty() {
        return Err(FooterFormatError::Body {
            reason: format!("{} bytes follow the gzip trailer", rest.len()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a footer as the reference writer does: an empty gzip member at
    /// level 0 with the payload in the extra field.
    pub(crate) fn footer_bytes(toc_offset: u64, legacy: bool) -> Vec<u8> {
        let payload = format!("{toc_offset:016x}STARGZ");
        let mut extra = Vec::new();
        if !legacy {
            extra.extend_from_slice(b"SG");
            extra.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        }
        extra.extend_from_slice(payload.as_bytes());
        let encoder = flate2::GzBuilder::new()
            .extra(extra)
            .write(Vec::new(), flate2::Compression::none());
        encoder.finish().unwrap()
    }

    fn blob_with_footer(prefix_len: usize, footer: &[u8]) -> Vec<u8> {
        let mut blob = vec![0u8; prefix_len];
        blob.extend_from_slice(footer);
        blob
    }

    fn tail(blob: &[u8]) -> &[u8] {
        let len = blob.len().min(FOOTER_SIZE as usize);
        &blob[blob.len() - len..]
    }

    #[test]
    fn footer_sizes_match_builder() {
        assert_eq!(footer_bytes(0, false).len() as u64, FOOTER_SIZE);
        assert_eq!(footer_bytes(0, true).len() as u64, LEGACY_FOOTER_SIZE);
    }

    #[test]
    fn parse_footer_valid() {
        let cases = [
            ("estargz", 1000usize, false, 999u64),
            ("estargz offset 0", 1000, false, 0),
            ("legacy", 1000, true, 999),
            ("legacy short blob", 2, true, 1),
        ];
        for (case, prefix, legacy, offset) in cases {
            let blob = blob_with_footer(prefix, &footer_bytes(offset, legacy));
            let footer = parse_footer(tail(&blob), blob.len() as u64)
                .unwrap_or_else(|error| panic!("case {case}: {error}"));
            let size = if legacy {
                LEGACY_FOOTER_SIZE
            } else {
                FOOTER_SIZE
            };
            assert_eq!(
                footer,
                Footer {
                    toc_offset: offset,
                    footer_size: size
                },
                "case {case}"
            );
        }
    }

    #[test]
    fn parse_footer_invalid() {
        let good = footer_bytes(100, false);
        let mut bad_magic = good.clone();
        bad_magic[0] = 0x00;
        let mut bad_flags = good.clone();
        bad_flags[3] = 0x0c;
        let mut bad_subfield = good.clone();
        bad_subfield[12] = b'X';
        let mut bad_payload = good.clone();
        bad_payload[33] = b'Q';
        let mut bad_hex = good.clone();
        bad_hex[16] = b'g';
        let mut bad_crc = good.clone();
        let crc_at = good.len() - 8;
        bad_crc[crc_at] ^= 0xff;

        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("bad magic", bad_magic, "gzip magic is [00, 8b]"),
            ("bad flags", bad_flags, "gzip flags are 0x0c"),
            ("bad subfield id", bad_subfield, "subfield id"),
            ("bad payload magic", bad_payload, "expected \"STARGZ\""),
            ("bad hex digit", bad_hex, "16 hexadecimal digits"),
            ("bad crc", bad_crc, "does not decompress"),
            ("plain gzip tail", vec![0x42; 51], "gzip magic"),
        ];
        for (case, footer, message) in cases {
            let blob = blob_with_footer(200, &footer);
            let error = parse_footer(tail(&blob), blob.len() as u64).unwrap_err();
            assert!(
                matches!(error, FooterError::NotFound { .. }),
                "case {case}: {error}"
            );
            assert!(
                error.to_string().contains(message),
                "case {case}: {error} lacks {message:?}"
            );
        }
    }

    #[test]
    fn parse_footer_offset_past_end() {
        for offset in [200u64, 201, u64::MAX >> 4] {
            let blob = blob_with_footer(200, &footer_bytes(offset, false));
            let error = parse_footer(tail(&blob), blob.len() as u64).unwrap_err();
            assert!(
                matches!(error, FooterError::OffsetPastEnd { limit: 200, .. }),
                "offset {offset}: {error}"
            );
            assert!(error.to_string().contains("footer offset past the end"));
        }
    }

    #[test]
    fn parse_footer_truncated() {
        let blob = footer_bytes(0, false);
        let error = parse_footer(&blob[..30], 30).unwrap_err();
        assert!(matches!(error, FooterError::BlobTooShort { .. }), "{error}");

        let error = parse_footer(&blob[..50], 51).unwrap_err();
        assert!(
            matches!(error, FooterError::TailLength { len: 50, .. }),
            "{error}"
        );

        let error = parse_footer(&blob[1..], 50).unwrap_err();
        assert!(matches!(error, FooterError::NotFound { .. }), "{error}");
    }
}
