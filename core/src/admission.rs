//! Who may try to enroll, and how often: bounds per source address on enrollment
//! connections held at once and on failed enrollments (a token bucket). Pure: time is passed in.
//!
//! A token is 256 random bits, so guessing one is hopeless anyway; these bounds keep a
//! hostile address from holding the coordinator's connections, CPU (CSR parsing, signing)
//! and log with a flood of attempts. Only failures spend the budget: a pool's nodes behind
//! one NAT address, enrolling with good tokens, never run into it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use skyward_common::limits::{
    ENROLL_FAILURE_BURST, ENROLL_FAILURE_REFILL, MAX_ENROLLING_PER_ADDRESS,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{address} already holds {limit} enrollment connections")]
    TooManyConnections { address: IpAddr, limit: usize },
    #[error("too many failed enrollments from {address}; next attempt allowed in {retry_after:?}")]
    TooManyFailures {
        address: IpAddr,
        retry_after: Duration,
    },
}

impl Refusal {
    /// When the address may try again: once its budget refills, or (for connections) once
    /// one of its enrollments in flight is likely done.
    pub fn retry_after(&self) -> Duration {
        match self {
            Refusal::TooManyConnections { .. } => Duration::from_secs(1),
            Refusal::TooManyFailures { retry_after, .. } => *retry_after,
        }
    }
}

struct Address {
    enrolling: usize,
    /// Failed attempts still allowed, refilled one per [`ENROLL_FAILURE_REFILL`].
    budget: f64,
    refilled: Instant,
}

impl Address {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled);
        self.budget = (self.budget + elapsed.as_secs_f64() / ENROLL_FAILURE_REFILL.as_secs_f64())
            .min(ENROLL_FAILURE_BURST as f64);
        self.refilled = now;
    }

    fn idle(&self) -> bool {
        self.enrolling == 0 && self.budget >= ENROLL_FAILURE_BURST as f64
    }
}

/// Addresses kept before idle ones are forgotten.
const PRUNE_ABOVE: usize = 1024;

#[derive(Default)]
pub struct Admission {
    addresses: HashMap<IpAddr, Address>,
}

/// Whose budget an address spends: an IPv4 address its own, an IPv6 address its /64's (one
/// host is routinely given a whole /64, so per-address limits would be per-host only in name),
/// an IPv4-mapped IPv6 address its IPv4 one's.
pub fn source_of(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::V6(octets.into())
            }
        },
    }
}

impl Admission {
    fn entry(&mut self, address: IpAddr, now: Instant) -> &mut Address {
        let address = source_of(address);
        if self.addresses.len() > PRUNE_ABOVE {
            self.addresses.retain(|_, a| {
                a.refill(now);
                !a.idle()
            });
        }
        let entry = self.addresses.entry(address).or_insert(Address {
            enrolling: 0,
            budget: ENROLL_FAILURE_BURST as f64,
            refilled: now,
        });
        entry.refill(now);
        entry
    }

    /// An enrollment connection from `address` begins; call [`end`](Self::end) when it ends.
    pub fn begin(&mut self, address: IpAddr, now: Instant) -> Result<(), Refusal> {
        let entry = self.entry(address, now);
        if entry.enrolling >= MAX_ENROLLING_PER_ADDRESS {
            return Err(Refusal::TooManyConnections {
                address,
                limit: MAX_ENROLLING_PER_ADDRESS,
            });
        }
        entry.enrolling += 1;
        Ok(())
    }

    pub fn end(&mut self, address: IpAddr) {
        if let Some(entry) = self.addresses.get_mut(&source_of(address)) {
            entry.enrolling = entry.enrolling.saturating_sub(1);
        }
    }

    /// Whether `address` may present a token now.
    pub fn may_attempt(&mut self, address: IpAddr, now: Instant) -> Result<(), Refusal> {
        let entry = self.entry(address, now);
        if entry.budget >= 1.0 {
            return Ok(());
        }
        Err(Refusal::TooManyFailures {
            address,
            retry_after: ENROLL_FAILURE_REFILL.mul_f64(1.0 - entry.budget),
        })
    }

    /// An enrollment from `address` failed: it spends one attempt.
    pub fn failed(&mut self, address: IpAddr, now: Instant) {
        let entry = self.entry(address, now);
        entry.budget = (entry.budget - 1.0).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_slash_64_shares_one_budget_and_limit() {
        let t0 = Instant::now();
        let mut admission = Admission::default();
        let host = |last: u16| IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, last]);
        for i in 0..ENROLL_FAILURE_BURST {
            // Each failure from another address of the same /64.
            admission.failed(host(i as u16 + 1), t0);
        }
        assert!(matches!(
            admission.may_attempt(host(999), t0),
            Err(Refusal::TooManyFailures { .. })
        ));
        // Another /64 has its own budget; so has an IPv4 address, mapped or not.
        assert!(admission
            .may_attempt(IpAddr::from([0x2001, 0xdb8, 0, 2, 0, 0, 0, 1]), t0)
            .is_ok());
        assert_eq!(
            source_of("::ffff:198.51.100.7".parse().unwrap()),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        // Connections held at once count per /64 too.
        for i in 0..MAX_ENROLLING_PER_ADDRESS {
            admission.begin(host(i as u16), t0).unwrap();
        }
        assert!(matches!(
            admission.begin(host(4000), t0),
            Err(Refusal::TooManyConnections { .. })
        ));
        admission.end(host(7));
        assert!(admission.begin(host(4000), t0).is_ok());
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn connections_per_address_are_bounded_and_released() {
        let mut admission = Admission::default();
        let now = Instant::now();
        for _ in 0..MAX_ENROLLING_PER_ADDRESS {
            admission.begin(A, now).unwrap();
        }
        assert_eq!(
            admission.begin(A, now),
            Err(Refusal::TooManyConnections {
                address: A,
                limit: MAX_ENROLLING_PER_ADDRESS
            })
        );
        // Another address is not affected, and a finished enrollment frees a place.
        admission.begin(B, now).unwrap();
        admission.end(A);
        admission.begin(A, now).unwrap();
    }

    #[test]
    fn failures_per_address_are_rate_limited() {
        let mut admission = Admission::default();
        let t0 = Instant::now();
        for _ in 0..ENROLL_FAILURE_BURST {
            admission.may_attempt(A, t0).unwrap();
            admission.failed(A, t0);
        }
        assert!(matches!(
            admission.may_attempt(A, t0),
            Err(Refusal::TooManyFailures { address: A, .. })
        ));
        admission.may_attempt(B, t0).unwrap();
        // One more attempt per refill period, no more.
        let later = t0 + ENROLL_FAILURE_REFILL;
        admission.may_attempt(A, later).unwrap();
        admission.failed(A, later);
        assert!(admission.may_attempt(A, later).is_err());
        // A long quiet spell restores the burst, and no more than the burst.
        let much_later = later + ENROLL_FAILURE_REFILL * 1000;
        for _ in 0..ENROLL_FAILURE_BURST {
            admission.may_attempt(A, much_later).unwrap();
            admission.failed(A, much_later);
        }
        assert!(admission.may_attempt(A, much_later).is_err());
    }

    #[test]
    fn idle_addresses_are_forgotten() {
        let mut admission = Admission::default();
        let t0 = Instant::now();
        for i in 0..(PRUNE_ABOVE as u32 * 2) {
            let address = IpAddr::V4(i.into());
            admission.begin(address, t0).unwrap();
            admission.end(address);
        }
        assert!(admission.addresses.len() <= PRUNE_ABOVE + 1);
    }
}
