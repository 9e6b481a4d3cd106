//! Tar header encoding for the eStargz writer: a ustar header, preceded by
//! a pax extended header (POSIX.1-2001) for values that ustar cannot hold.

use super::entry::EntryMeta;
use super::WriterError;

/// Tar block size; headers and data are padded to it.
pub const BLOCK_SIZE: u64 = 512;
/// The end-of-archive marker: two zero blocks.
pub const END_OF_ARCHIVE: [u8; 1024] = [0; 1024];

/// Largest value of an 8-byte octal field (7 digits and a NUL).
const MAX_OCTAL_8: u64 = 0o7777777;
/// Largest value of a 12-byte octal field (11 digits and a NUL).
const MAX_OCTAL_12: u64 = 0o77777777777;
/// Name given to pax extended headers, as Python's tarfile and GNU tar name them.
const PAX_HEADER_NAME: &[u8] = b"././@PaxHeader";

/// Bytes of padding after `size` bytes of data.
pub fn padding(size: u64) -> u64 {
    (BLOCK_SIZE - size % BLOCK_SIZE) % BLOCK_SIZE
}

/// Encodes the header block(s) of `meta`: a pax header when needed, then
/// the ustar header.
pub fn encode_header(meta: &EntryMeta) -> Result<Vec<u8>, WriterError> {
    let mut records: Vec<(String, Vec<u8>)> = Vec::new();

    if meta.name.len() > 100 {
        records.push(("path".to_string(), meta.name.clone()));
    }
    if meta.link_name.len() > 100 {
        records.push(("linkpath".to_string(), meta.link_name.clone()));
    }
    if meta.size > MAX_OCTAL_12 {
        records.push(("size".to_string(), meta.size.to_string().into_bytes()));
    }
    if meta.uid > MAX_OCTAL_8 {
        records.push(("uid".to_string(), meta.uid.to_string().into_bytes()));
    }
    if meta.gid > MAX_OCTAL_8 {
        records.push(("gid".to_string(), meta.gid.to_string().into_bytes()));
    }
    let mtime_fits = meta.mtime >= 0 && (meta.mtime as u64) <= MAX_OCTAL_12;
    if !mtime_fits || meta.mtime_nsec != 0 {
        records.push((
            "mtime".to_string(),
            format_pax_time(meta.mtime, meta.mtime_nsec).into_bytes(),
        ));
    }
    if meta.user_name.len() > 32 {
        records.push(("uname".to_string(), meta.user_name.clone().into_bytes()));
    }
    if meta.group_name.len() > 32 {
        records.push(("gname".to_string(), meta.group_name.clone().into_bytes()));
    }
    for (name, value) in &meta.xattrs {
        records.push((format!("SCHILY.xattr.{name}"), value.clone()));
    }
    let binary_path = records.iter().any(|(key, value)| {
        matches!(key.as_str(), "path" | "linkpath") && std::str::from_utf8(value).is_err()
    });
    if binary_path {
        records.insert(0, ("hdrcharset".to_string(), b"BINARY".to_vec()));
    }
    if u64::from(meta.dev_major) > MAX_OCTAL_8 || u64::from(meta.dev_minor) > MAX_OCTAL_8 {
        return Err(WriterError::InvalidEntry {
            name: meta.display_name(),
            field: "device number",
            reason: format!(
                "{}:{} does not fit a tar header (at most {MAX_OCTAL_8} each)",
                meta.dev_major, meta.dev_minor
            ),
        });
    }

    let mut out = Vec::with_capacity(1024);
    if !records.is_empty() {
        let body = encode_pax_records(&records);
        let mut pax = [0u8; BLOCK_SIZE as usize];
        put_bytes(&mut pax[0..100], PAX_HEADER_NAME);
        put_octal(&mut pax[100..108], 0o644);
        put_octal(&mut pax[108..116], 0);
        put_octal(&mut pax[116..124], 0);
        put_octal(&mut pax[124..136], body.len() as u64);
        put_octal(&mut pax[136..148], 0);
        pax[156] = b'x';
        finish_ustar(&mut pax);
        out.extend_from_slice(&pax);
        out.extend_from_slice(&body);
        out.resize(out.len() + padding(body.len() as u64) as usize, 0);
    }

    let mut header = [0u8; BLOCK_SIZE as usize];
    put_bytes(&mut header[0..100], truncate(&meta.name, 100));
    put_octal(&mut header[100..108], u64::from(meta.mode & 0o7777));
    put_octal(
        &mut header[108..116],
        if meta.uid <= MAX_OCTAL_8 { meta.uid } else { 0 },
    );
    put_octal(
        &mut header[116..124],
        if meta.gid <= MAX_OCTAL_8 { meta.gid } else { 0 },
    );
    put_octal(
        &mut header[124..136],
        if meta.size <= MAX_OCTAL_12 {
            meta.size
        } else {
            0
        },
    );
    put_octal(
        &mut header[136..148],
        if mtime_fits { meta.mtime as u64 } else { 0 },
    );
    header[156] = meta.kind.typeflag();
    put_bytes(&mut header[157..257], truncate(&meta.link_name, 100));
    put_bytes(
        &mut header[265..297],
        truncate(meta.user_name.as_bytes(), 32),
    );
    put_bytes(
        &mut header[297..329],
        truncate(meta.group_name.as_bytes(), 32),
    );
    put_octal(&mut header[329..337], u64::from(meta.dev_major));
    put_octal(&mut header[337..345], u64::from(meta.dev_minor));
    finish_ustar(&mut header);
    out.extend_from_slice(&header);
    Ok(out)
}

/// Formats a pax time: seconds, then a fraction without trailing zeros.
pub fn format_pax_time(seconds: i64, nanos: u32) -> String {
    if nanos == 0 {
        return seconds.to_string();
    }
    // A negative time with a fraction is written as -(whole + fraction).
    let (sign, whole, fraction) = if seconds < 0 {
        ("-", -(seconds + 1), 1_000_000_000 - nanos)
    } else {
        ("", seconds, nanos)
    };
    let fraction = format!("{fraction:09}");
    format!("{sign}{whole}.{}", fraction.trim_end_matches('0'))
}

/// Encodes pax records, `"<length> <key>=<value>\n"`, where the decimal
/// length counts the whole record including its own digits.
fn encode_pax_records(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in records {
        let rest = key.len() + value.len() + 3; // space, '=', newline
        let mut length = rest + 1;
        while length != rest + length.to_string().len() {
            length = rest + length.to_string().len();
        }
        out.extend_from_slice(length.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(key.as_bytes());
        out.push(b'=');
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

fn truncate(bytes: &[u8], max: usize) -> &[u8] {
    &bytes[..bytes.len().min(max)]
}

fn put_bytes(field: &mut [u8], value: &[u8]) {
    field[..value.len()].copy_from_slice(value);
}

/// Writes `value` as zero-padded octal digits followed by a NUL.
fn put_octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let digits = format!("{value:0width$o}");
    // Callers check the range first; only the low digits are kept otherwise.
    field[..width].copy_from_slice(&digits.as_bytes()[digits.len() - width..]);
    field[width] = 0;
}

/// Sets the ustar magic and version and the header checksum.
fn finish_ustar(header: &mut [u8; BLOCK_SIZE as usize]) {
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[148..156].fill(b' ');
    let sum: u32 = header.iter().map(|&byte| u32::from(byte)).sum();
    let digits = format!("{sum:06o}\0 ");
    header[148..156].copy_from_slice(digits.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::entry::EntryType;

    /// Writes `meta` with zero content as a one-entry tar and reads it back
    /// with the writer's tar reader.
    fn round_trip(meta: &EntryMeta) -> (Vec<u8>, EntryMeta) {
        let mut bytes = encode_header(meta).unwrap();
        bytes.extend(std::iter::repeat_n(0u8, meta.size as usize));
        bytes.resize(bytes.len() + padding(meta.size) as usize, 0);
        bytes.extend_from_slice(&END_OF_ARCHIVE);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.tar");
        std::fs::write(&path, &bytes).unwrap();
        let mut entries = crate::writer::read_tar_entries(&path).unwrap();
        assert_eq!(entries.len(), 1);
        (bytes, entries.remove(0).meta)
    }

    #[test]
    fn short_entry_needs_no_pax() {
        let meta = EntryMeta::regular("etc/hostname", 5);
        let (bytes, read) = round_trip(&meta);
        assert_eq!(bytes.len(), 512 + 512 + 1024);
        assert_eq!(read, meta);
    }

    #[test]
    fn long_values_go_to_pax() {
        let mut meta = EntryMeta::regular(&"d/".repeat(80), 3);
        meta.uid = 3_000_000;
        meta.mtime = 1_700_000_000;
        meta.mtime_nsec = 123_000_000;
        meta.user_name = "u".repeat(40);
        meta.xattrs.insert(
            "security.capability".to_string(),
            vec![1, 0, 0, 2, 0, b'\n'],
        );
        meta.xattrs.insert("user.empty".to_string(), Vec::new());
        let (bytes, read) = round_trip(&meta);
        assert_eq!(&bytes[156..157], b"x", "a pax header comes first");
        assert_eq!(read, meta);
    }

    #[test]
    fn negative_mtime_round_trips() {
        let mut meta = EntryMeta::regular("old", 0);
        meta.mtime = -86_400;
        meta.mtime_nsec = 5;
        let (_, read) = round_trip(&meta);
        assert_eq!((read.mtime, read.mtime_nsec), (-86_400, 5));
    }

    #[test]
    fn device_numbers_round_trip() {
        let mut meta = EntryMeta::regular("dev/null", 0);
        meta.kind = EntryType::Char;
        meta.dev_major = 1;
        meta.dev_minor = 3;
        let bytes = encode_header(&meta).unwrap();
        let header = tar::Header::from_byte_slice(&bytes[..512]);
        assert_eq!(header.device_major().unwrap(), Some(1));
        assert_eq!(header.device_minor().unwrap(), Some(3));
        assert_eq!(header.entry_type(), tar::EntryType::Char);
    }

    #[test]
    fn pax_record_lengths_count_themselves() {
        // 7 bytes of key/value plus 3 separators is 10; with two length
        // digits the record is 12 bytes, which still has two digits.
        let body = encode_pax_records(&[("k".to_string(), b"abcdef".to_vec())]);
        assert_eq!(body, b"12 k=abcdef\n");
        // 98 bytes plus two digits is 100, which needs three digits: 101.
        let body = encode_pax_records(&[("k".to_string(), vec![b'x'; 94])]);
        assert_eq!(&body[..4], b"101 ");
        assert_eq!(body.len(), 101);
    }

    #[test]
    fn format_pax_time_table() {
        let cases: [(i64, u32, &str); 4] = [
            (5, 0, "5"),
            (5, 500_000_000, "5.5"),
            (-2, 500_000_000, "-1.5"),
            (0, 1, "0.000000001"),
        ];
        for (seconds, nanos, expected) in cases {
            assert_eq!(format_pax_time(seconds, nanos), expected);
        }
    }
}
