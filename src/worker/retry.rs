//! Retry policy: data plus a pure function.

use std::time::Duration;

use crate::config::RetrySection;

/// When to try a failed event again, and when to give up.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all; the last failure makes the event `dead`.
    pub max_attempts: u32,
    /// The wait after the first failure.
    pub initial: Duration,
    /// No wait is longer, jitter and `Retry-After` included.
    pub max: Duration,
    /// Each wait is this many times the one before.
    pub multiplier: f64,
    /// Fraction of the delay that is randomised either way (0.2 = ±20%).
    pub jitter: f64,
}

impl From<&RetrySection> for RetryPolicy {
    fn from(section: &RetrySection) -> Self {
        Self {
            max_attempts: section.max_attempts,
            initial: section.initial.0,
            max: section.max.0,
            multiplier: section.multiplier,
            jitter: section.jitter,
        }
    }
}

impl RetryPolicy {
    /// Whether failed attempt number `attempt` (1-based) was the last one allowed.
    pub fn is_exhausted(&self, attempt: u32) -> bool {
        attempt >= self.max_attempts
    }

    /// The wait after failed attempt `attempt` (1-based). `unit`, in [-1, 1],
    /// chooses where within ±jitter the delay lands: callers pass a random
    /// number, tests pass fixed ones. Never more than `max`.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(1_000) as i32;
        let base = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = base.min(self.max.as_secs_f64());
        let jittered = capped * (1.0 + self.jitter * unit.clamp(-1.0, 1.0));
        Duration::from_secs_f64(jittered.clamp(0.0, self.max.as_secs_f64()))
    }

    /// `delay` with a random point in the jitter range.
    pub fn random_delay(&self, attempt: u32) -> Duration {
        self.delay(attempt, rand::random_range(-1.0..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 12,
            initial: Duration::from_secs(5),
            max: Duration::from_secs(6 * 3600),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }

    #[test]
    fn delays_double_from_the_initial_value() {
        let p = policy();
        assert_eq!(p.delay(1, 0.0), Duration::from_secs(5));
        assert_eq!(p.delay(2, 0.0), Duration::from_secs(10));
        assert_eq!(p.delay(5, 0.0), Duration::from_secs(80));
    }

    #[test]
    fn delays_never_exceed_the_maximum_even_with_jitter() {
        let p = policy();
        assert_eq!(p.delay(40, 0.0), p.max);
        assert_eq!(p.delay(40, 1.0), p.max);
        assert_eq!(p.delay(u32::MAX, 1.0), p.max);
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let p = policy();
        assert_eq!(p.delay(2, -1.0), Duration::from_secs(8));
        assert_eq!(p.delay(2, 1.0), Duration::from_secs(12));
        for _ in 0..1000 {
            let d = p.random_delay(3);
            assert!(
                d >= Duration::from_secs(16) && d <= Duration::from_secs(24),
                "{d:?}"
            );
        }
    }

    #[test]
    fn the_last_allowed_attempt_exhausts_the_policy() {
        let p = policy();
        assert!(!p.is_exhausted(11));
        assert!(p.is_exhausted(12));
    }
}
