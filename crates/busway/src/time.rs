//! ISO-8601 timestamps as the reference code writes them
//! (`datetime.utcnow().isoformat()`: UTC, no offset, microseconds).

use std::time::{SystemTime, UNIX_EPOCH};

/// `t` as `YYYY-MM-DDTHH:MM:SS.ffffff` in UTC.
pub(crate) fn iso8601_utc(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days(i64::try_from(secs / 86_400).unwrap_or(0));
    let sod = secs % 86_400;
    if !(0..=9999).contains(&y) {
        return format!(
            "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}",
            sod / 3600,
            sod % 3600 / 60,
            sod % 60,
            d.subsec_micros()
        );
    }
    // Every request and task carries one: written digit by digit, which
    // costs a small fraction of what `format!` does.
    let mut out = [0_u8; 26];
    let fields: [(u64, usize); 7] = [
        (y.unsigned_abs(), 4),
        (u64::from(m), 2),
        (u64::from(day), 2),
        (sod / 3600, 2),
        (sod % 3600 / 60, 2),
        (sod % 60, 2),
        (u64::from(d.subsec_micros()), 6),
    ];
    let separators = [b'-', b'-', b'T', b':', b':', b'.'];
    let mut at = 0;
    for (i, (value, width)) in fields.into_iter().enumerate() {
        let mut value = value;
        for slot in out[at..at + width].iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
        at += width;
        if let Some(&separator) = separators.get(i) {
            out[at] = separator;
            at += 1;
        }
    }
    out.iter().map(|&b| char::from(b)).collect()
}

/// The current time in the reference format.
pub(crate) fn now_iso8601() -> String {
    iso8601_utc(SystemTime::now())
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        u32::try_from(month).unwrap_or(1),
        u32::try_from(day).unwrap_or(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_like_python_isoformat() {
        let t = UNIX_EPOCH + Duration::from_micros(1_701_172_496_123_456);
        assert_eq!(iso8601_utc(t), "2023-11-28T11:54:56.123456");
        assert_eq!(iso8601_utc(UNIX_EPOCH), "1970-01-01T00:00:00.000000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(&iso8601_utc(leap)[..10], "2000-02-29");
        let last = UNIX_EPOCH + Duration::from_micros(253_402_300_799_999_999);
        assert_eq!(iso8601_utc(last), "9999-12-31T23:59:59.999999");
        let after = UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        assert_eq!(iso8601_utc(after), "10000-01-01T00:00:00.000000");
    }
}
