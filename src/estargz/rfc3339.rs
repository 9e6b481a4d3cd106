//! RFC 3339 timestamps (`2023-11-14T22:13:20Z`, `1969-07-20T20:17:40.5+01:00`)
//! as the eStargz TOC `modtime` field writes them.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid RFC 3339 timestamp {value:?}: {reason}")]
pub struct TimestampError {
    pub value: String,
    pub reason: &'static str,
}

/// Parses an RFC 3339 date-time into seconds since the Unix epoch and
/// nanoseconds.
///
/// Years 0000 to 9999 are accepted, so times before 1970 give negative
/// seconds. Fractions longer than nanoseconds are truncated. Leap seconds
/// (`:60`) are rejected, as Go's `time.Parse` does.
pub fn parse_rfc3339(value: &str) -> Result<(i64, u32), TimestampError> {
    let fail = |reason| TimestampError {
        value: value.to_string(),
        reason,
    };
    let bytes = value.as_bytes();
    if bytes.len() < 20 {
        return Err(fail("shorter than YYYY-MM-DDTHH:MM:SSZ"));
    }

    let digits = |range: std::ops::Range<usize>| -> Result<i64, TimestampError> {
        let field = &bytes[range];
        if !field.iter().all(u8::is_ascii_digit) {
            return Err(fail("expected digits"));
        }
        Ok(field
            .iter()
            .fold(0i64, |total, digit| total * 10 + i64::from(digit - b'0')))
    };
    let expect = |index: usize, allowed: &[u8], reason| {
        if allowed.contains(&bytes[index]) {
            Ok(())
        } else {
            Err(fail(reason))
        }
    };

    let year = digits(0..4)?;
    expect(4, b"-", "expected '-' after the year")?;
    let month = digits(5..7)?;
    expect(7, b"-", "expected '-' after the month")?;
    let day = digits(8..10)?;
    expect(10, b"Tt ", "expected 'T' between date and time")?;
    let hour = digits(11..13)?;
    expect(13, b":", "expected ':' after the hour")?;
    let minute = digits(14..16)?;
    expect(16, b":", "expected ':' after the minute")?;
    let second = digits(17..19)?;

    if !(1..=12).contains(&month) {
        return Err(fail("month out of range"));
    }
    if day < 1 || day > days_in_month(year, month) {
        return Err(fail("day out of range"));
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err(fail("time of day out of range"));
    }

    let mut index = 19;
    let mut nanos: u32 = 0;
    if bytes[index] == b'.' {
        index += 1;
        let start = index;
        while index < bytes.len() && bytes[index].is_ascii_digit() {
            let position = index - start;
            if position < 9 {
                nanos += u32::from(bytes[index] - b'0') * 10u32.pow(8 - position as u32);
            }
            index += 1;
        }
        if index == start {
            return Err(fail("expected digits after '.'"));
        }
    }

    let offset_seconds = match &bytes[index..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let offset_digits = [*h1, *h2, *m1, *m2];
            if !offset_digits.iter().all(u8::is_ascii_digit) {
                return Err(fail("expected digits in the UTC offset"));
            }
            let hours = i64::from((h1 - b'0') * 10 + (h2 - b'0'));
            let minutes = i64::from((m1 - b'0') * 10 + (m2 - b'0'));
            if hours > 23 || minutes > 59 {
                return Err(fail("UTC offset out of range"));
            }
            let magnitude = hours * 3600 + minutes * 60;
            if *sign == b'+' {
                magnitude
            } else {
                -magnitude
            }
        }
        _ => return Err(fail("expected 'Z' or a UTC offset like +01:00 at the end")),
    };

    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    Ok((seconds, nanos))
}

fn is_leap_year(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days between 1970-01-01 and the given proleptic Gregorian date, by
/// counting whole 400-year eras (146097 days each) from 0000-03-01.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let shifted_month = (month + 9) % 12;
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_rfc3339_valid() {
        let cases = [
            ("epoch", "1970-01-01T00:00:00Z", (0, 0)),
            (
                "fixture default",
                "2023-11-14T22:13:20Z",
                (1_700_000_000, 0),
            ),
            ("year 2100", "2100-01-01T00:00:00Z", (4_102_444_800, 0)),
            ("after 2038", "2038-01-19T03:14:08Z", (2_147_483_648, 0)),
            ("before 1970", "1969-12-31T23:59:59Z", (-1, 0)),
            ("moon landing", "1969-07-20T20:17:40Z", (-14_182_940, 0)),
            ("year 1", "0001-01-01T00:00:00Z", (-62_135_596_800, 0)),
            (
                "fraction",
                "2023-11-14T22:13:20.5Z",
                (1_700_000_000, 500_000_000),
            ),
            (
                "nanoseconds",
                "2023-11-14T22:13:20.123456789Z",
                (1_700_000_000, 123_456_789),
            ),
            (
                "fraction truncated",
                "2023-11-14T22:13:20.1234567899Z",
                (1_700_000_000, 123_456_789),
            ),
            (
                "positive offset",
                "2023-11-14T23:13:20+01:00",
                (1_700_000_000, 0),
            ),
            (
                "negative offset",
                "2023-11-14T17:13:20-05:00",
                (1_700_000_000, 0),
            ),
            ("leap day", "2024-02-29T00:00:00Z", (1_709_164_800, 0)),
            ("lowercase", "2023-11-14t22:13:20z", (1_700_000_000, 0)),
        ];
        for (case, input, expected) in cases {
            assert_eq!(parse_rfc3339(input), Ok(expected), "case {case}");
        }
    }

    #[test]
    fn parse_rfc3339_invalid() {
        let cases = [
            ("empty", ""),
            ("date only", "2023-11-14"),
            ("no zone", "2023-11-14T22:13:20"),
            ("bad month", "2023-13-14T22:13:20Z"),
            ("bad day", "2023-02-29T22:13:20Z"),
            ("leap second", "2016-12-31T23:59:60Z"),
            ("bad hour", "2023-11-14T24:00:00Z"),
            ("letters", "2023-1x-14T22:13:20Z"),
            ("empty fraction", "2023-11-14T22:13:20.Z"),
            ("short offset", "2023-11-14T22:13:20+01"),
            ("trailing text", "2023-11-14T22:13:20Zjunk"),
            ("multibyte", "2023-11-14T22:13:2é"),
        ];
        for (case, input) in cases {
            assert!(parse_rfc3339(input).is_err(), "case {case} parsed");
        }
    }
}
