//! Response-rate limiting (RRL): a token bucket per client network, so that `svcnat-dns`
//! cannot be used to reflect and amplify traffic at a victim whose address is spoofed.
//!
//! Pure: time is a parameter ([`Duration`] since any fixed epoch the caller picks), so the
//! limiter is tested without sleeping. Clients are grouped by network (a /24 for IPv4 and a
//! /56 for IPv6 by default, as BIND's `ipv4-prefix-length` and `ipv6-prefix-length`), each
//! network has a bucket of `burst` responses refilled at `responses_per_second`, and the
//! table of networks is bounded: a new network beyond `max_networks` evicts the one that
//! entered first. Over the limit a response is dropped, except every `slip`-th one, which
//! is sent truncated (TC=1, no records) so that a real client retries over TCP, which a
//! spoofed source cannot do (BIND's `slip`, default 2: every other response).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

/// The default budget per client network.
pub const DEFAULT_RESPONSES_PER_SECOND: u32 = 100;
/// The default number of client networks remembered.
pub const DEFAULT_MAX_NETWORKS: usize = 16_384;
/// The default slip: one over-limit response in two is sent truncated.
pub const DEFAULT_SLIP: u32 = 2;

/// How responses are limited.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RrlConfig {
    /// Responses per second each client network may get in the long run (at least 1).
    pub responses_per_second: u32,
    /// Responses a network may get at once after being quiet (at least 1).
    pub burst: u32,
    /// Every `slip`-th response over the limit is sent truncated instead of dropped (0:
    /// drop them all; 1: truncate them all).
    pub slip: u32,
    /// How many client networks the table holds.
    pub max_networks: usize,
    /// The prefix length grouping IPv4 clients (24).
    pub ipv4_prefix: u8,
    /// The prefix length grouping IPv6 clients (56).
    pub ipv6_prefix: u8,
    /// Clients never limited (BIND's `exempt-clients`).
    pub exempt: Vec<IpNet>,
}

impl RrlConfig {
    /// `rate` responses per second with a burst of `burst`, the other fields at their
    /// defaults.
    pub fn new(rate: u32, burst: u32) -> RrlConfig {
        RrlConfig {
            responses_per_second: rate.max(1),
            burst: burst.max(1),
            slip: DEFAULT_SLIP,
            max_networks: DEFAULT_MAX_NETWORKS,
            ipv4_prefix: 24,
            ipv6_prefix: 56,
            exempt: Vec::new(),
        }
    }
}

impl Default for RrlConfig {
    fn default() -> RrlConfig {
        RrlConfig::new(DEFAULT_RESPONSES_PER_SECOND, DEFAULT_RESPONSES_PER_SECOND)
    }
}

/// What to do with one response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Within the budget: send it.
    Send,
    /// Over the budget, a slip turn: send it truncated (TC=1, no records).
    Slip,
    /// Over the budget: send nothing.
    Drop,
}

/// One client network's bucket.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Credit in nanoseconds of refill time; a response costs `cost` of it.
    credit: u64,
    /// When the credit was last brought up to date.
    updated: Duration,
    /// Responses over the limit so far (for the slip turn).
    over: u32,
}

/// The rate limiter: a bounded table of client networks and their buckets.
#[derive(Debug)]
pub struct RateLimiter {
    config: RrlConfig,
    /// Nanoseconds of credit one response costs (1 s / rate).
    cost: u64,
    /// The most credit a bucket holds (`burst` responses).
    capacity: u64,
    buckets: HashMap<IpNet, Bucket>,
    /// Networks in the order they entered the table; the front is evicted first.
    order: VecDeque<IpNet>,
}

impl RateLimiter {
    /// A limiter with an empty table.
    pub fn new(config: RrlConfig) -> RateLimiter {
        let cost = 1_000_000_000 / u64::from(config.responses_per_second.max(1));
        let capacity = cost.saturating_mul(u64::from(config.burst.max(1)));
        RateLimiter {
            config,
            cost,
            capacity,
            buckets: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RrlConfig {
        &self.config
    }

    /// How many client networks the table holds now.
    pub fn networks(&self) -> usize {
        self.buckets.len()
    }

    /// The network `client` is counted in (its /24 or /56 by default).
    pub fn network_of(&self, client: IpAddr) -> IpNet {
        let client = client.to_canonical();
        let prefix = match client {
            IpAddr::V4(_) => self.config.ipv4_prefix.min(32),
            IpAddr::V6(_) => self.config.ipv6_prefix.min(128),
        };
        // The prefix is within the family's length, so `new` cannot fail.
        IpNet::new(client, prefix).map_or_else(|_| IpNet::from(client), |n| n.trunc())
    }

    /// Charges one response to `client`'s network at time `now` and says what to do with
    /// it. `now` must not go backwards (a smaller value counts as no time passing).
    pub fn check(&mut self, client: IpAddr, now: Duration) -> Verdict {
        let client = client.to_canonical();
        if self.config.exempt.iter().any(|n| n.contains(&client)) {
            return Verdict::Send;
        }
        let net = self.network_of(client);
        if !self.buckets.contains_key(&net) {
            while self.buckets.len() >= self.config.max_networks.max(1) {
                let Some(oldest) = self.order.pop_front() else {
                    break;
                };
                self.buckets.remove(&oldest);
            }
            self.order.push_back(net);
            self.buckets.insert(
                net,
                Bucket {
                    credit: self.capacity,
                    updated: now,
                    over: 0,
                },
            );
        }
        let Some(bucket) = self.buckets.get_mut(&net) else {
            // Inserted just above.
            return Verdict::Send;
        };
        let elapsed = now.saturating_sub(bucket.updated);
        let elapsed = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        bucket.credit = bucket.credit.saturating_add(elapsed).min(self.capacity);
        bucket.updated = bucket.updated.max(now);
        if bucket.credit >= self.cost {
            bucket.credit -= self.cost;
            return Verdict::Send;
        }
        bucket.over = bucket.over.wrapping_add(1);
        match self.config.slip {
            0 => Verdict::Drop,
            slip if bucket.over % slip == 0 => Verdict::Slip,
            _ => Verdict::Drop,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The verdicts of `n` responses to `client` at time `now`.
    fn burst_of(rl: &mut RateLimiter, client: &str, n: usize, now: Duration) -> Vec<Verdict> {
        (0..n).map(|_| rl.check(ip(client), now)).collect()
    }

    #[test]
    fn a_burst_then_drop_and_slip_alternate() {
        let mut rl = RateLimiter::new(RrlConfig::new(10, 5));
        let v = burst_of(&mut rl, "192.0.2.1", 9, ms(0));
        use Verdict::*;
        assert_eq!(v, [Send, Send, Send, Send, Send, Drop, Slip, Drop, Slip]);
    }

    #[test]
    fn the_bucket_refills_at_the_rate_and_no_further_than_the_burst() {
        let mut rl = RateLimiter::new(RrlConfig::new(10, 5));
        assert!(
            burst_of(&mut rl, "192.0.2.1", 5, ms(0))
                .iter()
                .all(|v| *v == Verdict::Send)
        );
        assert_ne!(rl.check(ip("192.0.2.1"), ms(0)), Verdict::Send);
        // 10/s: one response every 100 ms.
        assert_ne!(rl.check(ip("192.0.2.1"), ms(99)), Verdict::Send);
        assert_eq!(rl.check(ip("192.0.2.1"), ms(100)), Verdict::Send);
        assert_ne!(rl.check(ip("192.0.2.1"), ms(150)), Verdict::Send);
        assert_eq!(rl.check(ip("192.0.2.1"), ms(200)), Verdict::Send);
        // A long quiet time refills to the burst, not beyond.
        let v = burst_of(&mut rl, "192.0.2.1", 7, ms(60_000));
        assert_eq!(v.iter().filter(|v| **v == Verdict::Send).count(), 5);
        // Time going backwards gives no credit.
        assert_ne!(rl.check(ip("192.0.2.1"), ms(0)), Verdict::Send);
    }

    #[test]
    fn clients_share_a_slash_24_or_56_and_networks_are_apart() {
        let mut rl = RateLimiter::new(RrlConfig::new(1, 2));
        assert_eq!(burst_of(&mut rl, "192.0.2.1", 2, ms(0)), [Verdict::Send; 2]);
        // Another host of the same /24 shares the empty bucket.
        assert_ne!(rl.check(ip("192.0.2.200"), ms(0)), Verdict::Send);
        // The next /24 has its own.
        assert_eq!(rl.check(ip("192.0.3.1"), ms(0)), Verdict::Send);
        // IPv6: the /56.
        assert_eq!(
            burst_of(&mut rl, "2001:db8:0:1::1", 2, ms(0)),
            [Verdict::Send; 2]
        );
        assert_ne!(rl.check(ip("2001:db8:0:ff::2"), ms(0)), Verdict::Send);
        assert_eq!(rl.check(ip("2001:db8:0:100::1"), ms(0)), Verdict::Send);
        // An IPv4-mapped address counts as IPv4.
        assert_ne!(rl.check(ip("::ffff:192.0.2.7"), ms(0)), Verdict::Send);
        assert_eq!(
            rl.network_of(ip("::ffff:192.0.2.7")),
            "192.0.2.0/24".parse::<IpNet>().unwrap()
        );
    }

    #[test]
    fn the_table_is_bounded_and_evicts_the_oldest_network() {
        let mut config = RrlConfig::new(1, 1);
        config.max_networks = 3;
        let mut rl = RateLimiter::new(config);
        for n in 1..=3 {
            assert_eq!(rl.check(ip(&format!("10.0.{n}.1")), ms(0)), Verdict::Send);
        }
        assert_eq!(rl.networks(), 3);
        // 10.0.1/24 is over its budget...
        assert_ne!(rl.check(ip("10.0.1.1"), ms(0)), Verdict::Send);
        // ...until a fourth network pushes it out of the table.
        assert_eq!(rl.check(ip("10.0.4.1"), ms(0)), Verdict::Send);
        assert_eq!(rl.networks(), 3);
        assert_eq!(rl.check(ip("10.0.1.1"), ms(0)), Verdict::Send);
        // Now 10.0.2/24 went (it was the oldest), 10.0.3/24 is still limited.
        assert_ne!(rl.check(ip("10.0.3.1"), ms(0)), Verdict::Send);
        assert_eq!(rl.networks(), 3);
    }

    #[test]
    fn slip_zero_drops_all_and_one_truncates_all_and_exempt_clients_pass() {
        let mut config = RrlConfig::new(1, 1);
        config.slip = 0;
        let mut rl = RateLimiter::new(config.clone());
        let v = burst_of(&mut rl, "192.0.2.1", 4, ms(0));
        assert_eq!(
            v,
            [Verdict::Send, Verdict::Drop, Verdict::Drop, Verdict::Drop]
        );
        config.slip = 1;
        config.exempt = vec!["10.244.0.0/16".parse().unwrap()];
        let mut rl = RateLimiter::new(config);
        let v = burst_of(&mut rl, "192.0.2.1", 3, ms(0));
        assert_eq!(v, [Verdict::Send, Verdict::Slip, Verdict::Slip]);
        assert_eq!(
            burst_of(&mut rl, "10.244.3.3", 50, ms(0)),
            [Verdict::Send; 50]
        );
        assert_eq!(rl.networks(), 1, "exempt clients take no table entry");
    }
}
