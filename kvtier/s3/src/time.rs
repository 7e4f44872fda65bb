//! The three time formats of S3: SigV4's `20130524T000000Z`, the XML bodies'
//! ISO-8601 `2013-05-24T00:00:00.000Z`, and HTTP dates (through `httpdate`).
//!
//! Civil dates come from day counts (Howard Hinnant's days-from-civil
//! arithmetic), so no time-zone database or calendar crate is needed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Unix seconds of a time, negative before 1970.
pub(crate) fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn from_unix_secs(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count from 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

fn civil(t: SystemTime) -> Civil {
    let secs = unix_secs(t);
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400) as u32;
    Civil {
        year,
        month,
        day,
        hour: rem / 3600,
        minute: rem / 60 % 60,
        second: rem % 60,
    }
}

/// SigV4's basic ISO-8601 form: `20130524T000000Z`.
pub fn amz_datetime(t: SystemTime) -> String {
    let c = civil(t);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    )
}

/// Parses `yyyymmddThhmmssZ`; `None` for anything else.
pub fn parse_amz_datetime(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let digits = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = &b[range];
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        part.iter()
            .try_fold(0u32, |acc, d| acc.checked_mul(10)?.checked_add(u32::from(d - b'0')))
    };
    let year = digits(0..4)?;
    let month = digits(4..6)?;
    let day = digits(6..8)?;
    let hour = digits(9..11)?;
    let minute = digits(11..13)?;
    let second = digits(13..15)?;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(i64::from(year), month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let days = days_from_civil(i64::from(year), month, day);
    Some(from_unix_secs(
        days * 86_400 + i64::from(hour * 3600 + minute * 60 + second),
    ))
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

/// The XML bodies' form, with milliseconds: `2013-05-24T00:00:00.000Z`.
pub fn iso8601_ms(t: SystemTime) -> String {
    let c = civil(t);
    let millis = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.subsec_millis(),
        // Before 1970 the sub-second part counts backwards; S3 has no such
        // objects, so whole seconds are enough.
        Err(_) => 0,
    };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second, millis
    )
}

/// An HTTP date (`Fri, 24 May 2013 00:00:00 GMT`) for `Last-Modified`.
pub fn http_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

/// Parses any of the three HTTP date forms; `None` if it is none of them.
pub fn parse_http_date(s: &str) -> Option<SystemTime> {
    httpdate::parse_http_date(s.trim()).ok()
}

/// A time truncated to whole seconds, as HTTP dates carry it.
pub(crate) fn whole_secs(t: SystemTime) -> SystemTime {
    from_unix_secs(unix_secs(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sigv4_example_time_round_trips() {
        let t = parse_amz_datetime("20130524T000000Z").unwrap();
        assert_eq!(unix_secs(t), 1_369_353_600);
        assert_eq!(amz_datetime(t), "20130524T000000Z");
        assert_eq!(http_date(t), "Fri, 24 May 2013 00:00:00 GMT");
    }

    #[test]
    fn civil_days_round_trip_across_leap_years_and_eras() {
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(days_from_civil(2000, 2, 29)), (2000, 2, 29));
    }

    #[test]
    fn bad_amz_datetimes_are_refused() {
        for bad in [
            "",
            "20130524T000000",
            "20130524 000000Z",
            "2013052AT000000Z",
            "20131324T000000Z",
            "20130230T000000Z",
            "20130524T240000Z",
            "20130524T006000Z",
            "+0130524T000000Z",
        ] {
            assert!(parse_amz_datetime(bad).is_none(), "{bad}");
        }
        assert!(parse_amz_datetime("20240229T235959Z").is_some());
        assert!(parse_amz_datetime("20230229T000000Z").is_none());
    }

    #[test]
    fn iso8601_carries_milliseconds() {
        let t = UNIX_EPOCH + Duration::from_millis(1_369_353_600_123);
        assert_eq!(iso8601_ms(t), "2013-05-24T00:00:00.123Z");
        assert_eq!(iso8601_ms(whole_secs(t)), "2013-05-24T00:00:00.000Z");
    }

    #[test]
    fn http_dates_parse_in_all_three_forms() {
        let want = parse_amz_datetime("19941106T084937Z").unwrap();
        for s in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(parse_http_date(s), Some(want), "{s}");
        }
        assert_eq!(parse_http_date("yesterday"), None);
    }
}
