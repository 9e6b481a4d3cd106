//! Pieces of tar extension headers shared by the layer reader and the image
//! writer: pax records (POSIX.1-2001 `x` and `g` headers), pax times and the
//! NUL-terminated names of GNU long-name headers.

use std::collections::BTreeMap;

/// Returns `data` up to its first NUL byte, or all of it.
pub fn until_nul(data: &[u8]) -> &[u8] {
    let end = data
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(data.len());
    &data[..end]
}

/// Parses pax records, `"<length> <key>=<value>\n"` each, where the decimal
/// length counts the whole record. Keys and values are raw bytes, and values may
/// contain newlines. Trailing NUL padding ends the records. The error describes what is
/// malformed.
pub fn parse_records(mut data: &[u8]) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, String> {
    let mut records = BTreeMap::new();
    while !data.is_empty() && !data.iter().all(|&byte| byte == 0) {
        let space = data
            .iter()
            .position(|&byte| byte == b' ')
            .ok_or_else(|| "a record has no length".to_string())?;
        let length: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| {
                format!(
                    "record length {:?} is not a number",
                    String::from_utf8_lossy(&data[..space])
                )
            })?;
        if length <= space + 1 || length > data.len() {
            return Err(format!(
                "record length {length} does not fit the {} bytes left",
                data.len()
            ));
        }
        let record = data[space + 1..length]
            .strip_suffix(b"\n")
            .ok_or_else(|| "a record does not end with a newline".to_string())?;
        let equals = record
            .iter()
            .position(|&byte| byte == b'=')
            .ok_or_else(|| "a record has no '='".to_string())?;
        records.insert(record[..equals].to_vec(), record[equals + 1..].to_vec());
        data = &data[length..];
    }
    Ok(records)
}

/// Parses a pax time, `[-]seconds[.fraction]`, into seconds and nanoseconds
/// (`-1.25` is 1.25 s before the epoch: seconds -2, nanoseconds 750000000).
/// Digits past nanoseconds are dropped.
pub fn parse_time(value: &[u8]) -> Option<(i64, u32)> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    if whole.is_empty() || !whole.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    if !fraction.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let seconds: i64 = whole.parse().ok()?;
    let mut nanos: u32 = 0;
    for (position, digit) in fraction.bytes().take(9).enumerate() {
        nanos += u32::from(digit - b'0') * 10u32.pow(8 - position as u32);
    }

    if !negative {
        return Some((seconds, nanos));
    }
    if nanos == 0 {
        return Some((-seconds, 0));
    }
    Some((-seconds - 1, 1_000_000_000 - nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_cases() {
        type Case<'a> = (&'a [u8], Option<(i64, u32)>);
        let cases: [Case; 11] = [
            (b"1700000000", Some((1_700_000_000, 0))),
            (b"1700000000.5", Some((1_700_000_000, 500_000_000))),
            (
                b"1700000000.123456789123",
                Some((1_700_000_000, 123_456_789)),
            ),
            (b"-1.25", Some((-2, 750_000_000))),
            (b"-1.5", Some((-2, 500_000_000))),
            (b"-5", Some((-5, 0))),
            (b"", None),
            (b"1.2.3", None),
            (b"1.x", None),
            (b"abc", None),
            (b"-", None),
        ];
        for (input, expected) in cases {
            assert_eq!(
                parse_time(input),
                expected,
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn records_keep_newlines() {
        let records = parse_records(b"22 SCHILY.xattr.a=x\ny\n9 path=p\n\0\0\0").unwrap();
        assert_eq!(records[b"SCHILY.xattr.a".as_slice()], b"x\ny");
        assert_eq!(records[b"path".as_slice()], b"p");
        assert_eq!(records.len(), 2);
    }

    #[test]
    fn records_reject_malformed() {
        let cases: [&[u8]; 8] = [
            b"nolength\n",
            b"99 path=x\n",
            b"10 pathxxx\n",
            b"11 path=abc",
            b"x path=a\n",
            b"5 a=b",
            b"6 ab\n\n",
            b"2 a=b\n",
        ];
        for input in cases {
            assert!(
                parse_records(input).is_err(),
                "input {:?} parsed",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn until_nul_cases() {
        assert_eq!(until_nul(b"name\0rest"), b"name");
        assert_eq!(until_nul(b"name"), b"name");
        assert_eq!(until_nul(b"\0"), b"");
    }
}
