//! Human durations in config files: "500ms", "30s", "5m", "24h", "7d".

use std::time::Duration;

/// Parses `<integer><unit>` with unit ms, s, m, h or d.
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| {
        format!("{s:?} is not a duration; write e.g. \"500ms\", \"30s\", \"5m\", \"24h\", \"7d\"")
    })?;
    let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs);
    let d = match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => None,
    };
    let d = d.ok_or_else(|| {
        format!("{s:?} is not a duration; units are ms, s, m, h and d (e.g. \"30s\")")
    })?;
    if d > MAX {
        return Err(format!(
            "{s:?} is too long: durations are at most {}",
            format(MAX)
        ));
    }
    Ok(d)
}

/// The longest duration a config may give: every deadline the daemon computes from one stays
/// far from the limits of the clock's arithmetic.
pub const MAX: Duration = Duration::from_secs(366 * 86_400);

/// Formats a duration the way `parse` reads it, in the largest exact unit.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if s != 0 && s.is_multiple_of(size) {
            return format!("{}{unit}", s / size);
        }
    }
    format!("{s}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse("2d"), Ok(Duration::from_secs(172_800)));
    }

    #[test]
    fn rejects_durations_past_a_year_and_a_day() {
        assert_eq!(parse("366d"), Ok(MAX));
        let e = parse("200000000000000d").unwrap_err();
        assert!(e.contains("too long: durations are at most 366d"), "{e}");
        assert!(parse("367d").is_err());
        assert!(parse("9999999999999999s").is_err());
    }

    #[test]
    fn rejects_missing_or_unknown_units() {
        assert!(parse("30").unwrap_err().contains("units are"));
        assert!(parse("1w").is_err());
        assert!(parse("h").is_err());
        assert!(parse("99999999999999999999s").is_err());
    }

    #[test]
    fn format_round_trips() {
        for s in ["250ms", "30s", "5m", "36h", "2d"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
    }
}
