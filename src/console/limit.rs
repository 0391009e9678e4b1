//! How many failed sign-ins the console takes: after [`Limits::per_client`]
//! failures within [`Limits::window`] from one client address, that address's
//! sign-ins (the login form and `Authorization: Bearer` alike) are answered 429
//! until the oldest of those failures is older than the window; after
//! [`Limits::global`] failures within the window from all addresses together,
//! everyone's are. A refused attempt is not checked and does not count, so a
//! client that keeps trying gets no further. A signed-in browser's session is not
//! a sign-in: it keeps working throughout.
//!
//! Pure bookkeeping with the time passed in (the console passes `Instant::now()`),
//! so the tests drive it through any sequence without a clock. Memory is bounded:
//! at most [`Limits::per_client`] instants per address, [`Limits::global`] in all,
//! and at most [`Limits::max_clients`] addresses (when full, expired ones go first,
//! then the one whose last failure is the oldest). IPv6 addresses count per /64,
//! the block one client usually holds.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Failures from one address within `window` before its sign-ins are refused.
    pub per_client: usize,
    /// Failures from all addresses within `window` before every sign-in is refused.
    pub global: usize,
    /// How long a failure counts.
    pub window: Duration,
    /// Addresses remembered at once.
    pub max_clients: usize,
}

impl Limits {
    /// The console's limits: 5 failures a minute from one address, 50 from all.
    pub const CONSOLE: Limits = Limits {
        per_client: 5,
        global: 50,
        window: Duration::from_secs(60),
        max_clients: 4096,
    };
}

/// Whose failures refused a sign-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// This address's.
    Client,
    /// Every address's together.
    Everyone,
}

/// Whether a sign-in may be checked now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refused (429) for `retry_after` more.
    Refuse {
        scope: Scope,
        retry_after: Duration,
    },
}

/// The failed sign-ins of the last window.
#[derive(Debug)]
pub struct FailedLogins {
    limits: Limits,
    clients: HashMap<IpAddr, VecDeque<Instant>>,
    all: VecDeque<Instant>,
}

/// The key an address counts under: itself (IPv4), or its /64 (IPv6; an
/// IPv4-mapped IPv6 address counts as the IPv4 address).
pub fn client_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let [a, b, c, d, ..] = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
            }
        },
    }
}

impl FailedLogins {
    pub fn new(limits: Limits) -> FailedLogins {
        FailedLogins {
            limits,
            clients: HashMap::new(),
            all: VecDeque::new(),
        }
    }

    /// Whether a sign-in from `addr` may be checked at `now`.
    pub fn check(&mut self, addr: IpAddr, now: Instant) -> Verdict {
        let window = self.limits.window;
        forget(&mut self.all, now, window);
        let key = client_key(addr);
        if let Some(times) = self.clients.get_mut(&key) {
            forget(times, now, window);
            if let Some(wait) = full(times, self.limits.per_client, now, window) {
                return Verdict::Refuse {
                    scope: Scope::Client,
                    retry_after: wait,
                };
            }
            if times.is_empty() {
                self.clients.remove(&key);
            }
        }
        match full(&self.all, self.limits.global, now, window) {
            Some(wait) => Verdict::Refuse {
                scope: Scope::Everyone,
                retry_after: wait,
            },
            None => Verdict::Allow,
        }
    }

    /// A sign-in from `addr` failed at `now`. Returns the verdict for the next one
    /// (a `Refuse` here: this failure reached a limit).
    pub fn failed(&mut self, addr: IpAddr, now: Instant) -> Verdict {
        let window = self.limits.window;
        let key = client_key(addr);
        if !self.clients.contains_key(&key) && self.clients.len() >= self.limits.max_clients {
            self.make_room(now);
        }
        let times = self.clients.entry(key).or_default();
        forget(times, now, window);
        push_bounded(times, now, self.limits.per_client);
        forget(&mut self.all, now, window);
        push_bounded(&mut self.all, now, self.limits.global);
        self.check(addr, now)
    }

    /// Addresses remembered (for tests and bounds).
    pub fn tracked(&self) -> usize {
        self.clients.len()
    }

    /// Drop the addresses whose failures all expired; if none did, the one whose
    /// last failure is the oldest.
    fn make_room(&mut self, now: Instant) {
        let window = self.limits.window;
        self.clients.retain(|_, times| {
            forget(times, now, window);
            !times.is_empty()
        });
        if self.clients.len() < self.limits.max_clients {
            return;
        }
        let oldest = self
            .clients
            .iter()
            .min_by_key(|(_, times)| times.back().copied())
            .map(|(k, _)| *k);
        if let Some(k) = oldest {
            self.clients.remove(&k);
        }
    }
}

/// Drop the instants older than `window`.
fn forget(times: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while times
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= window)
    {
        times.pop_front();
    }
}

/// Keep at most `cap` instants, the newest.
fn push_bounded(times: &mut VecDeque<Instant>, now: Instant, cap: usize) {
    times.push_back(now);
    while times.len() > cap.max(1) {
        times.pop_front();
    }
}

/// With `limit` failures in the window: how long until the oldest expires.
fn full(
    times: &VecDeque<Instant>,
    limit: usize,
    now: Instant,
    window: Duration,
) -> Option<Duration> {
    if times.len() < limit.max(1) {
        return None;
    }
    let oldest = times.front()?;
    Some(window.saturating_sub(now.saturating_duration_since(*oldest)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: Limits = Limits {
        per_client: 3,
        global: 5,
        window: Duration::from_secs(60),
        max_clients: 4,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn an_address_is_refused_after_its_failures_until_the_oldest_expires() {
        let t0 = Instant::now();
        let mut f = FailedLogins::new(SMALL);
        let a = ip("203.0.113.7");
        assert_eq!(f.check(a, t0), Verdict::Allow);
        assert_eq!(f.failed(a, t0), Verdict::Allow);
        assert_eq!(f.failed(a, t0 + s(10)), Verdict::Allow);
        // the third within the minute reaches the limit
        assert_eq!(
            f.failed(a, t0 + s(20)),
            Verdict::Refuse {
                scope: Scope::Client,
                retry_after: s(40)
            }
        );
        assert_eq!(
            f.check(a, t0 + s(59)),
            Verdict::Refuse {
                scope: Scope::Client,
                retry_after: s(1)
            }
        );
        // another address is not concerned
        assert_eq!(f.check(ip("198.51.100.1"), t0 + s(30)), Verdict::Allow);
        // the first failure is a minute old: one more try, and it counts
        assert_eq!(f.check(a, t0 + s(60)), Verdict::Allow);
        assert_eq!(
            f.failed(a, t0 + s(61)),
            Verdict::Refuse {
                scope: Scope::Client,
                retry_after: s(9)
            }
        );
        // failures spread wider than the window never refuse
        let b = ip("198.51.100.2");
        for i in 0..10 {
            assert_eq!(f.failed(b, t0 + s(200 + 31 * i)), Verdict::Allow, "{i}");
        }
    }

    #[test]
    fn failures_from_every_address_together_refuse_everyone() {
        let t0 = Instant::now();
        let mut f = FailedLogins::new(SMALL);
        for i in 0..4u8 {
            let v = f.failed(IpAddr::from([192, 0, 2, i]), t0 + s(u64::from(i)));
            assert_eq!(v, Verdict::Allow, "{i}");
        }
        assert_eq!(
            f.failed(ip("192.0.2.200"), t0 + s(10)),
            Verdict::Refuse {
                scope: Scope::Everyone,
                retry_after: s(50)
            }
        );
        // a fresh address too, and a correct token would not be checked
        assert_eq!(
            f.check(ip("198.51.100.9"), t0 + s(30)),
            Verdict::Refuse {
                scope: Scope::Everyone,
                retry_after: s(30)
            }
        );
        assert_eq!(f.check(ip("198.51.100.9"), t0 + s(60)), Verdict::Allow);
    }

    #[test]
    fn ipv6_counts_per_64_and_memory_stays_bounded() {
        let t0 = Instant::now();
        let mut f = FailedLogins::new(SMALL);
        f.failed(ip("2001:db8:1:2::1"), t0);
        f.failed(ip("2001:db8:1:2::ffff"), t0);
        assert!(matches!(
            f.failed(ip("2001:db8:1:2:abcd::9"), t0),
            Verdict::Refuse {
                scope: Scope::Client,
                ..
            }
        ));
        assert_eq!(f.check(ip("2001:db8:1:3::1"), t0), Verdict::Allow);
        assert_eq!(
            client_key(ip("::ffff:192.0.2.1")),
            ip("192.0.2.1"),
            "a mapped IPv4 address is the IPv4 address"
        );
        // many addresses, one failure each, spread out: never more than max_clients
        let mut f = FailedLogins::new(Limits {
            global: 1_000_000,
            ..SMALL
        });
        for i in 0..1000u32 {
            f.failed(
                IpAddr::from(i.to_be_bytes()),
                t0 + Duration::from_millis(u64::from(i)),
            );
            assert!(f.tracked() <= SMALL.max_clients);
        }
        // the newest are the ones kept
        let last = IpAddr::from(999u32.to_be_bytes());
        f.failed(last, t0 + s(2));
        assert!(matches!(
            f.failed(last, t0 + s(3)),
            Verdict::Refuse {
                scope: Scope::Client,
                ..
            }
        ));
    }
}
