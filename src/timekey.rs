//! Timekey windows in a time zone, as Fluentd's `timekey` and `timekey_zone` make them: the
//! window of an event at `t` starts at `t - ((t + offset) % timekey)`, where `offset` is the
//! zone's offset from UTC at `t`, so that daily windows start at the zone's midnight; the
//! strftime placeholders of object keys and partition keys are that start, in that zone.
//! In UTC (the default) the offset is 0.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, FixedOffset, Offset, TimeZone};

/// Where timekey windows start and object keys' times are written (Fluentd's `timekey_zone`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    /// A fixed offset from UTC (`UTC`, `+09:00`, `-0500`).
    Fixed(FixedOffset),
    /// A zone of the IANA database (`Europe/Berlin`), its offset changing with daylight saving.
    Named(chrono_tz::Tz),
}

impl Zone {
    pub const UTC: Zone = Zone::Fixed(FixedOffset::east_opt(0).expect("0 is a valid offset"));

    /// Seconds east of UTC at the instant `secs` (Unix seconds).
    pub fn offset_at(self, secs: i64) -> i64 {
        match self {
            Zone::Fixed(offset) => i64::from(offset.local_minus_utc()),
            Zone::Named(tz) => DateTime::from_timestamp(secs, 0).map_or(0, |t| {
                i64::from(
                    tz.offset_from_utc_datetime(&t.naive_utc())
                        .fix()
                        .local_minus_utc(),
                )
            }),
        }
    }

    /// `secs` (Unix seconds) written with strftime `format` in this zone.
    pub fn format(self, secs: i64, format: &str) -> String {
        let utc = DateTime::from_timestamp(secs, 0).unwrap_or_default();
        match self {
            Zone::Fixed(offset) => utc.with_timezone(&offset).format(format).to_string(),
            Zone::Named(tz) => utc.with_timezone(&tz).format(format).to_string(),
        }
    }
}

impl Default for Zone {
    fn default() -> Self {
        Zone::UTC
    }
}

impl FromStr for Zone {
    type Err = String;

    /// `UTC` or `Z`; an offset `+09:00`, `+0900` or `+09` (`-` west of UTC); or an IANA name
    /// such as `Asia/Tokyo`, as Fluentd's `timekey_zone` takes them.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("utc") || s == "Z" {
            return Ok(Zone::UTC);
        }
        if let Some(sign) = s.chars().next().filter(|c| *c == '+' || *c == '-') {
            let digits: String = s[1..].chars().filter(|c| *c != ':').collect();
            let (hours, minutes) = match digits.len() {
                2 => (&digits[..], "0"),
                4 => (&digits[..2], &digits[2..]),
                _ => return Err(invalid(s)),
            };
            if !digits.bytes().all(|b| b.is_ascii_digit()) || s[1..].matches(':').count() > 1 {
                return Err(invalid(s));
            }
            let (hours, minutes): (i32, i32) = (
                hours.parse().map_err(|_| invalid(s))?,
                minutes.parse().map_err(|_| invalid(s))?,
            );
            if minutes >= 60 {
                return Err(invalid(s));
            }
            let secs = (hours * 3600 + minutes * 60) * if sign == '-' { -1 } else { 1 };
            return FixedOffset::east_opt(secs)
                .map(Zone::Fixed)
                .ok_or_else(|| invalid(s));
        }
        s.parse::<chrono_tz::Tz>()
            .map(Zone::Named)
            .map_err(|_| invalid(s))
    }
}

fn invalid(s: &str) -> String {
    format!("invalid time zone {s:?} (examples: UTC, +09:00, -0500, Europe/Berlin)")
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Zone::Fixed(offset) if offset.local_minus_utc() == 0 => f.write_str("UTC"),
            Zone::Fixed(offset) => write!(f, "{offset}"),
            Zone::Named(tz) => f.write_str(tz.name()),
        }
    }
}

/// The timekey: the windows' length and the zone they start in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timekey {
    /// Seconds, at least 1.
    pub secs: i64,
    pub zone: Zone,
}

impl Timekey {
    /// Windows of `secs` seconds in UTC.
    pub fn utc(secs: i64) -> Self {
        Timekey {
            secs,
            zone: Zone::UTC,
        }
    }

    /// Start (Unix seconds) of the window holding the event time `secs`.
    pub fn window_of(self, secs: i64) -> i64 {
        self.windows()(secs)
    }

    /// [`Timekey::window_of`] as a function, its zone looked at once: for the entries of a
    /// request, where a fixed offset (UTC by default) is the same for all.
    pub fn windows(self) -> impl Fn(i64) -> i64 {
        let len = self.secs.max(1);
        let fixed = match self.zone {
            Zone::Fixed(offset) => Some(i64::from(offset.local_minus_utc())),
            Zone::Named(_) => None,
        };
        move |secs| {
            let offset = fixed.unwrap_or_else(|| self.zone.offset_at(secs));
            secs - secs.saturating_add(offset).rem_euclid(len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-30T23:30:00Z.
    const LATE_EVENING_UTC: i64 = 1_796_081_400;

    #[test]
    fn zones_are_read_as_fluentd_writes_them() {
        let east = |h: i32, m: i32| Zone::Fixed(FixedOffset::east_opt(h * 3600 + m * 60).unwrap());
        for (text, zone) in [
            ("UTC", Zone::UTC),
            ("utc", Zone::UTC),
            ("Z", Zone::UTC),
            ("+09:00", east(9, 0)),
            ("+0900", east(9, 0)),
            ("+09", east(9, 0)),
            ("-05:30", east(-5, -30)),
            ("Asia/Tokyo", Zone::Named(chrono_tz::Asia::Tokyo)),
        ] {
            assert_eq!(text.parse::<Zone>(), Ok(zone), "{text}");
        }
        for bad in [
            "",
            "+9",
            "+25:00",
            "+09:60",
            "+09:00:00",
            "Mars/Olympus",
            "0900",
        ] {
            assert!(bad.parse::<Zone>().is_err(), "{bad:?}");
        }
        assert_eq!(Zone::UTC.to_string(), "UTC");
        assert_eq!(east(9, 0).to_string(), "+09:00");
    }

    #[test]
    fn daily_windows_start_at_the_zones_midnight() {
        let day = 86_400;
        // 08:30 on 2026-12-01 in Tokyo: its window starts at Tokyo's midnight, 15:00Z the
        // day before, and its keys say 2026/12/01.
        let tokyo = Timekey {
            secs: day,
            zone: "+09:00".parse().unwrap(),
        };
        let start = tokyo.window_of(LATE_EVENING_UTC);
        assert_eq!(start, LATE_EVENING_UTC - 8 * 3600 - 1800);
        assert_eq!(
            tokyo.zone.format(start, "%Y/%m/%d %H:%M"),
            "2026/12/01 00:00"
        );
        let utc = Timekey::utc(day);
        assert_eq!(
            utc.window_of(LATE_EVENING_UTC),
            LATE_EVENING_UTC - 23 * 3600 - 1800
        );
        assert_eq!(
            utc.zone.format(utc.window_of(LATE_EVENING_UTC), "%Y/%m/%d"),
            "2026/11/30"
        );
        // West of UTC, and before 1970.
        let new_york = Timekey {
            secs: day,
            zone: "-05:00".parse().unwrap(),
        };
        assert_eq!(
            new_york.window_of(LATE_EVENING_UTC),
            LATE_EVENING_UTC - 18 * 3600 - 1800
        );
        assert_eq!(Timekey::utc(60).window_of(-1), -60);
    }

    #[test]
    fn a_named_zone_follows_daylight_saving() {
        let berlin = Timekey {
            secs: 3600,
            zone: "Europe/Berlin".parse().unwrap(),
        };
        // Winter (+01:00) and summer (+02:00): hourly windows start on the hour either way,
        // and keys say the local hour.
        let winter = 1_796_081_400; // 2026-12-01T00:30+01:00
        let summer = 1_782_862_200; // 2026-07-01T01:30+02:00
        assert_eq!(berlin.zone.offset_at(winter), 3600);
        assert_eq!(berlin.zone.offset_at(summer), 7200);
        assert_eq!(
            berlin.zone.format(berlin.window_of(winter), "%H:%M"),
            "00:00"
        );
        assert_eq!(
            berlin.zone.format(berlin.window_of(summer), "%H:%M"),
            "01:00"
        );
        let daily = Timekey {
            secs: 86_400,
            ..berlin
        };
        assert_eq!(
            daily
                .zone
                .format(daily.window_of(summer), "%Y-%m-%d %H:%M %z"),
            "2026-07-01 00:00 +0200"
        );
    }
}
