//! TOC JSON (`stargz.index.json`) as the eStargz writer emits it, with the
//! field names and omit-when-empty rules of the eStargz spec.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Serialize;

use super::entry::EntryMeta;

/// The TOC document.
#[derive(Debug, Serialize)]
pub struct TocDocument {
    pub version: i64,
    pub entries: Vec<TocEntry>,
}

/// One TOC entry; zero and empty fields are omitted, as the reference writer does.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TocEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "is_zero")]
    pub size: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub modtime: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub mode: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub uid: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub gid: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub user_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub group_name: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub dev_major: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub dev_minor: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub digest: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub inner_offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub chunk_offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub chunk_size: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub chunk_digest: String,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl TocEntry {
    /// The metadata fields of an entry; data fields (digest, offsets) are
    /// filled by the writer.
    pub fn from_meta(meta: &EntryMeta) -> TocEntry {
        TocEntry {
            // NOTE: JSON strings are UTF-8, so a non-UTF-8 name is stored with
            // U+FFFD replacements in the TOC (the tar keeps the raw bytes),
            // as the reference writer does.
            name: String::from_utf8_lossy(&meta.name).into_owned(),
            kind: meta.kind.toc_name(),
            size: meta.size,
            modtime: format_rfc3339(meta.mtime, meta.mtime_nsec),
            link_name: String::from_utf8_lossy(&meta.link_name).into_owned(),
            mode: u64::from(meta.mode),
            uid: meta.uid,
            gid: meta.gid,
            user_name: meta.user_name.clone(),
            group_name: meta.group_name.clone(),
            dev_major: u64::from(meta.dev_major),
            dev_minor: u64::from(meta.dev_minor),
            xattrs: meta
                .xattrs
                .iter()
                .map(|(name, value)| {
                    (
                        name.clone(),
                        base64::engine::general_purpose::STANDARD.encode(value),
                    )
                })
                .collect(),
            ..TocEntry::default()
        }
    }
}

/// Formats a Unix time as RFC 3339 in UTC, with a fraction only when
/// `nanos` is not zero (`2023-11-14T22:13:20Z`, `...:20.5Z`).
///
/// Unlike the reference writer, which omits `modtime` for the epoch, time 0
/// is written out, so every reader gets 1970 and not its zero value.
pub fn format_rfc3339(seconds: i64, nanos: u32) -> String {
    let days = seconds.div_euclid(86_400);
    let second_of_day = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let mut text = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    );
    if nanos != 0 {
        let fraction = format!("{nanos:09}");
        text.push('.');
        text.push_str(fraction.trim_end_matches('0'));
    }
    text.push('Z');
    text
}

/// Converts days since 1970-01-01 to a proleptic Gregorian date (the
/// era-based algorithm of Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estargz::parse_rfc3339;

    #[test]
    fn format_rfc3339_table() {
        let cases: [(i64, u32, &str); 6] = [
            (0, 0, "1970-01-01T00:00:00Z"),
            (1_700_000_000, 0, "2023-11-14T22:13:20Z"),
            (4_102_444_800, 0, "2100-01-01T00:00:00Z"),
            (951_782_400, 0, "2000-02-29T00:00:00Z"),
            (-1, 500_000_000, "1969-12-31T23:59:59.5Z"),
            (1_700_000_000, 123_456_789, "2023-11-14T22:13:20.123456789Z"),
        ];
        for (seconds, nanos, expected) in cases {
            let text = format_rfc3339(seconds, nanos);
            assert_eq!(text, expected);
            assert_eq!(parse_rfc3339(&text).unwrap(), (seconds, nanos), "{text}");
        }
    }

    #[test]
    fn empty_fields_are_omitted() {
        let entry = TocEntry {
            name: "a".to_string(),
            kind: "dir",
            ..TocEntry::default()
        };
        let json = serde_json::to_string(&entry).unwrap();
        assert_eq!(json, r#"{"name":"a","type":"dir"}"#);
    }
}
