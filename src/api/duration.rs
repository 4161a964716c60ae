//! Go/Kubernetes-style duration strings (`500ms`, `30s`, `5m`, `2h`, `14d`, `1h30m`).

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// [`DURATION_PATTERN`] as a literal, for CEL rules built with `concat!`.
macro_rules! duration_pattern {
    () => {
        "^([0-9]{1,10}(ms|s|m|h|d))+$"
    };
}
pub(crate) use duration_pattern;

/// Pattern every duration string matches; also put in the CRD schema. At most
/// [`DURATION_MAX_DIGITS`] digits per number and [`DURATION_MAX_LEN`] characters: no string
/// it admits overflows the parser (u64 milliseconds) or CEL's int64 arithmetic.
pub const DURATION_PATTERN: &str = duration_pattern!();
/// Longest duration string accepted (keeps CEL cost estimates bounded).
pub const DURATION_MAX_LEN: usize = 32;
/// Most digits in one number of a duration (`9999999999d` is about 27 million years).
pub const DURATION_MAX_DIGITS: usize = 10;

/// 10^DURATION_MAX_DIGITS: the first number that needs too many digits.
const MAX_NUMBER: u64 = 10_000_000_000;

const UNITS: [(&str, u64); 5] = [
    ("ms", 1),
    ("s", 1_000),
    ("m", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
];

/// A non-negative duration with millisecond precision, written as a Go-style string.
///
/// ```
/// use msgpipe::api::Duration;
/// let d: Duration = "1h30m".parse().unwrap();
/// assert_eq!(d.as_millis(), 5_400_000);
/// assert_eq!(d.to_string(), "90m");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration {
    millis: u64,
}

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (expected e.g. 500ms, 30s, 5m, 2h, 14d)")]
pub struct ParseDurationError {
    input: String,
    reason: &'static str,
}

impl Duration {
    pub const fn from_millis(millis: u64) -> Self {
        Self { millis }
    }

    pub const fn from_secs(secs: u64) -> Self {
        Self {
            millis: secs * 1_000,
        }
    }

    pub const fn as_millis(self) -> u64 {
        self.millis
    }

    pub fn as_std(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.millis)
    }

    /// True when Kubernetes CEL `duration()` (Go's parser, no `d` unit) can read it.
    pub fn is_go_parsable(text: &str) -> bool {
        !text.contains('d')
    }
}

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let fail = |reason| ParseDurationError {
            input: input.chars().take(64).collect(),
            reason,
        };
        if input.is_empty() {
            return Err(fail("empty"));
        }
        if input.len() > DURATION_MAX_LEN {
            return Err(fail("too long"));
        }
        let mut rest = input;
        let mut total: u64 = 0;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(fail("a number must come before each unit"));
            }
            if digits > DURATION_MAX_DIGITS {
                return Err(fail("at most 10 digits per number"));
            }
            let value: u64 = rest[..digits]
                .parse()
                .map_err(|_| fail("number too large"))?;
            rest = &rest[digits..];
            // "ms" must be tried before "m".
            let (unit, factor) = UNITS
                .iter()
                .find(|(unit, _)| rest.starts_with(unit))
                .ok_or_else(|| fail("unknown or missing unit; use ms, s, m, h or d"))?;
            rest = &rest[unit.len()..];
            let part = value
                .checked_mul(*factor)
                .ok_or_else(|| fail("too large"))?;
            total = total.checked_add(part).ok_or_else(|| fail("too large"))?;
        }
        Ok(Self { millis: total })
    }
}

impl fmt::Display for Duration {
    /// Shortest exact form in a single unit: `1500ms`, `90s`, `5m`, `14d`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.millis == 0 {
            return f.write_str("0s");
        }
        // UNITS[0] is 1ms, which divides everything, so a unit is always found.
        let (unit, factor) = UNITS
            .iter()
            .rev()
            .find(|(_, factor)| self.millis.is_multiple_of(*factor))
            .unwrap_or(&UNITS[0]);
        let count = self.millis / factor;
        if count < MAX_NUMBER {
            return write!(f, "{count}{unit}");
        }
        // Too many digits for one number: every unit, largest first (`12725d19h53m47s775ms`).
        let mut rest = self.millis;
        for (unit, factor) in UNITS.iter().rev() {
            let count = rest / factor;
            rest %= factor;
            if count > 0 {
                write!(f, "{count}{unit}")?;
            }
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": DURATION_MAX_LEN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_compounds() {
        let cases = [
            ("500ms", 500),
            ("30s", 30_000),
            ("5m", 300_000),
            ("2h", 7_200_000),
            ("14d", 1_209_600_000),
            ("1h30m", 5_400_000),
            ("1m500ms", 60_500),
            ("0s", 0),
        ];
        for (text, millis) in cases {
            assert_eq!(
                text.parse::<Duration>().map(Duration::as_millis),
                Ok(millis),
                "{text}"
            );
        }
    }

    #[test]
    fn refuses_malformed_strings_with_a_reason() {
        for bad in [
            "",
            "5",
            "s",
            "1x",
            "1.5s",
            "-1s",
            "1 s",
            "1S",
            "99999999999999999999s",
            "1h 2m",
        ] {
            let err = bad.parse::<Duration>().expect_err(bad);
            assert!(err.to_string().contains("invalid duration"), "{err}");
        }
    }

    #[test]
    fn displays_in_the_largest_exact_unit() {
        let cases = [
            (1_500, "1500ms"),
            (90_000, "90s"),
            (300_000, "5m"),
            (86_400_000, "1d"),
            (0, "0s"),
            (1_099_511_627_775, "12725d19h53m47s775ms"),
        ];
        for (millis, text) in cases {
            assert_eq!(Duration::from_millis(millis).to_string(), text);
        }
    }

    #[test]
    fn the_largest_strings_the_pattern_admits_parse() {
        let pattern = regex::Regex::new(DURATION_PATTERN).expect("pattern");
        // The largest sums 32 characters can spell: two 10-digit day counts and the rest.
        for text in [
            "9999999999d9999999999d999999999d",
            "9999999999d9999999999d9999999h1s",
            "99999999ms99999999ms99999999ms9s",
            "9999999999d",
        ] {
            assert!(
                pattern.is_match(text) && text.len() <= DURATION_MAX_LEN,
                "{text}"
            );
            let millis = text.parse::<Duration>().expect(text).as_millis();
            assert!(i64::try_from(millis).is_ok(), "{text} fits CEL's int64");
        }
    }

    #[test]
    fn the_parser_refuses_exactly_what_the_pattern_refuses() {
        let pattern = regex::Regex::new(DURATION_PATTERN).expect("pattern");
        for text in [
            "99999999999999999999d",
            "12345678901s",
            "1.5s",
            "s",
            "1x",
            "",
            "1h30m",
            "0s",
            "0000000001ms",
        ] {
            let admitted = pattern.is_match(text) && text.len() <= DURATION_MAX_LEN;
            assert_eq!(text.parse::<Duration>().is_ok(), admitted, "{text:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn anything_the_schema_admits_parses(text in "([0-9]{1,10}(ms|s|m|h|d)){1,6}") {
            if text.len() <= DURATION_MAX_LEN {
                proptest::prop_assert!(text.parse::<Duration>().is_ok(), "{}", text);
            }
        }

        #[test]
        fn display_round_trips(millis in 0u64..(1u64 << 40)) {
            let d = Duration::from_millis(millis);
            proptest::prop_assert_eq!(d.to_string().parse::<Duration>(), Ok(d));
        }

        #[test]
        fn parser_never_panics(text in "\\PC{0,40}") {
            let _ = text.parse::<Duration>();
        }
    }
}
