//! Durations as users write them: `250ms`, `5s`, `10m`, `6h`, `30d`.

use std::{fmt, str::FromStr, time::Duration};

use serde::{de, Deserialize, Deserializer};

/// A duration parsed from the human form used in the config file and on the
/// command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    pub const fn from_millis(millis: u64) -> Self {
        Self(Duration::from_millis(millis))
    }
}

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(text.trim())
            .map(Self)
            .map_err(|e| format!("`{text}` is not a duration like 250ms, 5s, 10m, 6h or 30d ({e})"))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_the_spec_names_parses() {
        for (text, secs) in [("5s", 5), ("10m", 600), ("6h", 21_600), ("30d", 2_592_000)] {
            assert_eq!(
                text.parse::<HumanDuration>().unwrap().0,
                Duration::from_secs(secs)
            );
        }
        assert_eq!(
            "250ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(250)
        );
    }

    #[test]
    fn a_bare_number_is_refused() {
        assert!("5".parse::<HumanDuration>().is_err());
    }
}
