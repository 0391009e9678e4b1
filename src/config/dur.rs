//! Durations as people write them in the config: `"250ms"`, `"5s"`, `"24h"`, `"90d"`.
//!
//! Parsing accepts whatever `humantime` accepts; printing gives the shortest exact
//! single-unit form (`90d`, not humantime's `2months 29days 7h 21m 36s`; hours up to
//! `48h`, days above), so
//! `check-config`, logs and messages show a value the way it was written and it
//! reads back to the same duration.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A config duration.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Dur(pub Duration);

/// Units from the largest down; a duration prints in the largest that divides it.
const UNITS: [(&str, u128); 7] = [
    ("d", 86_400_000_000_000),
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        if nanos == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in UNITS {
            // up to two days read better in hours ("24h", "47h", the 48h window)
            if unit == "d" && nanos <= 2 * size {
                continue;
            }
            if nanos % size == 0 {
                return write!(f, "{}{unit}", nanos / size);
            }
        }
        write!(f, "{nanos}ns")
    }
}

impl fmt::Debug for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|e| serde::de::Error::custom(format!("bad duration {s:?}: {e}")))
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl From<Duration> for Dur {
    fn from(d: Duration) -> Self {
        Dur(d)
    }
}

/// A duration the way the config writes it: `fmt_duration(Duration::from_secs(5))`
/// is `"5s"` (e.g. for "no reply within 5s").
pub fn fmt_duration(d: Duration) -> String {
    Dur(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Dur {
        serde_json::from_value(serde_json::Value::String(s.into())).unwrap()
    }

    #[test]
    fn prints_as_written_and_reads_back() {
        for s in [
            "5s", "500ms", "24h", "90d", "30s", "5m", "47h", "36h", "1500ms", "250us", "7ns", "0s",
        ] {
            let d = parse(s);
            assert_eq!(d.to_string(), s);
            assert_eq!(format!("{d:?}"), s);
            assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{s}\""));
            assert_eq!(parse(&d.to_string()), d);
        }
        assert_eq!(parse("1h 30m").to_string(), "90m");
        assert_eq!(parse("2days").to_string(), "48h");
        assert_eq!(parse("3days").to_string(), "3d");
        assert_eq!(parse("1d").to_string(), "24h");
        assert_eq!(fmt_duration(Duration::from_secs(5)), "5s");
        assert_eq!(fmt_duration(Duration::from_millis(100)), "100ms");
    }

    #[test]
    fn parsing_is_unchanged() {
        assert!(serde_json::from_value::<Dur>(serde_json::Value::String("soon".into())).is_err());
        assert_eq!(parse(" 250ms ").0, Duration::from_millis(250));
        assert_eq!(parse("90d").0, Duration::from_secs(90 * 86_400));
    }
}
