//! Time as the ledger stores it: milliseconds since the Unix epoch, UTC, and its RFC 3339 text.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 } as i64;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-11-29T05:55:41.123Z`
pub fn rfc3339(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!("{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", sod / 3600, sod % 3600 / 60, sod % 60, ms % 1000)
}

/// Checks a calendar date `YYYY-MM-DD` and returns its day number.
pub fn parse_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = s.get(r)?;
        part.bytes().all(|c| c.is_ascii_digit()).then(|| part.parse().ok())?
    };
    let (y, m, d) = (num(0..4)? as i64, num(5..7)?, num(8..10)?);
    if !(1..=12).contains(&m) || d == 0 {
        return None;
    }
    let days = days_from_civil(y, m, d);
    (civil_from_days(days) == (y, m, d)).then_some(days)
}

/// Accepts `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SS[.fff]Z` (UTC) and returns ms since the epoch.
pub fn parse_timestamp(s: &str) -> Option<u64> {
    let days = parse_date(s.get(..10)?)?;
    let rest = &s[10..];
    let mut ms = days.checked_mul(86_400_000)?;
    if !rest.is_empty() {
        let t = rest.strip_prefix('T')?.strip_suffix('Z')?;
        // Digits only: no signs, no empty fraction after the dot.
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit());
        let (hms, frac) = match t.split_once('.') {
            Some((hms, frac)) if digits(frac) => (hms, frac),
            Some(_) => return None,
            None => (t, ""),
        };
        let parts: Vec<&str> = hms.split(':').collect();
        if parts.len() != 3 || parts.iter().any(|p| p.len() != 2 || !digits(p)) {
            return None;
        }
        let n: Vec<i64> = parts.iter().map(|p| p.parse().ok()).collect::<Option<_>>()?;
        if n[0] > 23 || n[1] > 59 || n[2] > 60 || frac.len() > 3 {
            return None;
        }
        let frac_ms = if frac.is_empty() { 0 } else { format!("{frac:0<3}").parse::<i64>().ok()? };
        ms += (n[0] * 3600 + n[1] * 60 + n[2]) * 1000 + frac_ms;
    }
    u64::try_from(ms).ok()
}

/// Midnight UTC at the start of a calendar date, in ms since the epoch (0 before 1970).
pub fn date_ms(y: i64, m: u32, d: u32) -> u64 {
    (days_from_civil(y, m, d).max(0) as u64) * 86_400_000
}

/// The calendar date (UTC) of a time.
pub fn ymd(ms: u64) -> (i64, u32, u32) {
    civil_from_days((ms / 86_400_000) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_764_395_741_123), "2025-11-29T05:55:41.123Z");
        assert_eq!(parse_timestamp("2025-11-29T05:55:41.123Z"), Some(1_764_395_741_123));
        assert_eq!(parse_timestamp("2024-02-29"), Some(1_709_164_800_000));
        assert_eq!(parse_date("2023-02-29"), None);
        assert_eq!(parse_date("2023-13-01"), None);
        assert_eq!(parse_date("2023-1-01"), None);
        assert_eq!(parse_timestamp("2023-01-01T25:00:00Z"), None);
        for signed in ["2023-01-01T+1:00:00Z", "2023-01-01T00:00:00.-5Z", "2023-01-01T00:00:00.Z"] {
            assert_eq!(parse_timestamp(signed), None, "{signed}");
        }
    }

    #[test]
    fn every_day_round_trips() {
        for day in -1000..30_000i64 {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
    }
}
