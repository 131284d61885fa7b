//! Rate limits per client address. Refused traffic (bad signatures, addresses
//! outside `allow_ips`, oversized bodies, bad payloads) spends its own
//! allowance, `receiver.refusal_rate_limit`: an address that uses it up is
//! answered 429 before its body is read, and never spends the allowance of
//! deliveries that verify (the source's `rate_limit`).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    num::NonZeroU32,
    sync::Mutex,
    time::Instant,
};

use governor::{
    clock::{Clock, DefaultClock},
    DefaultKeyedRateLimiter, Quota, RateLimiter,
};

use crate::config::RateLimitSection;

/// At most this many throttled addresses are remembered; beyond it, the ones
/// whose throttle ended are forgotten first.
const THROTTLED_REMEMBERED: usize = 100_000;

pub struct AddressLimits {
    verified: Option<DefaultKeyedRateLimiter<IpAddr>>,
    refused: DefaultKeyedRateLimiter<IpAddr>,
    throttled: Mutex<HashMap<IpAddr, Instant>>,
}

fn limiter(limit: RateLimitSection) -> DefaultKeyedRateLimiter<IpAddr> {
    let per_second = NonZeroU32::new(limit.per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
    RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst))
}

/// IPv6 clients are limited per /64: one host can hold a whole /64.
fn client_key(client: Option<IpAddr>) -> IpAddr {
    match client {
        Some(IpAddr::V6(v6)) => {
            let segments = v6.segments();
            IpAddr::V6(Ipv6Addr::new(
                segments[0],
                segments[1],
                segments[2],
                segments[3],
                0,
                0,
                0,
                0,
            ))
        }
        Some(v4) => v4,
        None => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

impl AddressLimits {
    pub fn new(verified: Option<RateLimitSection>, refused: RateLimitSection) -> Self {
        Self {
            verified: verified.map(limiter),
            refused: limiter(refused),
            throttled: Mutex::new(HashMap::new()),
        }
    }

    /// First of all: `Err(seconds to wait)` while the address is throttled for
    /// the refusals it caused.
    pub fn check_throttled(&self, client: Option<IpAddr>) -> Result<(), u64> {
        let key = client_key(client);
        let mut throttled = self.throttled.lock().expect("throttle lock");
        match throttled.get(&key) {
            Some(until) if *until > Instant::now() => {
                Err(until.saturating_duration_since(Instant::now()).as_secs() + 1)
            }
            Some(_) => {
                throttled.remove(&key);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// After a refusal: spends the address's refusal allowance, and throttles
    /// the address once it is used up.
    pub fn refused(&self, client: Option<IpAddr>) {
        let key = client_key(client);
        if let Err(not_until) = self.refused.check_key(&key) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let mut throttled = self.throttled.lock().expect("throttle lock");
            if throttled.len() >= THROTTLED_REMEMBERED {
                let now = Instant::now();
                throttled.retain(|_, until| *until > now);
            }
            if throttled.len() < THROTTLED_REMEMBERED {
                throttled.insert(key, Instant::now() + wait);
            }
        }
    }

    /// After verification: `Err(seconds to wait)` when the address has used up
    /// the source's allowance.
    pub fn check_verified(&self, client: Option<IpAddr>) -> Result<(), u64> {
        let Some(limiter) = &self.verified else {
            return Ok(());
        };
        limiter.check_key(&client_key(client)).map_err(|not_until| {
            not_until
                .wait_time_from(DefaultClock::default().now())
                .as_secs()
                + 1
        })
    }

    /// Forgets addresses whose buckets are full again (memory stays bounded).
    pub fn forget_idle(&self) {
        self.refused.retain_recent();
        self.refused.shrink_to_fit();
        if let Some(verified) = &self.verified {
            verified.retain_recent();
            verified.shrink_to_fit();
        }
        let now = Instant::now();
        self.throttled
            .lock()
            .expect("throttle lock")
            .retain(|_, until| *until > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn refusals_throttle_their_own_address_and_never_spend_the_verified_allowance() {
        let limits = AddressLimits::new(
            Some(RateLimitSection {
                per_second: 1,
                burst: 2,
            }),
            RateLimitSection {
                per_second: 1,
                burst: 3,
            },
        );
        for _ in 0..4 {
            assert!(limits.check_throttled(ip("198.51.100.7")).is_ok());
            limits.refused(ip("198.51.100.7"));
        }
        assert!(limits.check_throttled(ip("198.51.100.7")).is_err());
        assert!(limits.check_throttled(ip("203.0.113.5")).is_ok());
        assert!(limits.check_verified(ip("198.51.100.7")).is_ok());
        assert!(limits.check_verified(ip("198.51.100.7")).is_ok());
        assert!(limits.check_verified(ip("198.51.100.7")).is_err());
    }

    #[test]
    fn ipv6_clients_share_a_limit_per_64() {
        assert_eq!(
            client_key(ip("2001:db8:1:2:aaaa::1")),
            client_key(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            client_key(ip("2001:db8:1:2::1")),
            client_key(ip("2001:db8:1:3::1"))
        );
    }
}
