//! Percentiles, medians and number formatting.

use std::time::Duration;

/// Latency samples of one sequential measurement.
#[derive(Debug, Clone)]
pub struct Latency {
    pub p50: Duration,
    pub p99: Duration,
}

impl Latency {
    pub fn from_samples(mut samples: Vec<Duration>) -> Latency {
        samples.sort_unstable();
        Latency {
            p50: percentile(&samples, 50.0),
            p99: percentile(&samples, 99.0),
        }
    }
}

/// Nearest-rank percentile of sorted samples (zero for none).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median of a few values (the upper middle one for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

/// Throughputs (per second) measured in pairs: Skyward's run, then the peer's straight after,
/// so that each pair shares the machine's state of the moment. They are compared by the
/// median of the pairs' ratios, not by medians taken apart, where one slow run on one side
/// against a fast one on the other would make the verdict.
#[derive(Debug, Clone, Default)]
pub struct Pairs {
    pub sky: Vec<f64>,
    pub peer: Vec<f64>,
}

impl Pairs {
    pub fn push(&mut self, sky: f64, peer: f64) {
        self.sky.push(sky);
        self.peer.push(peer);
    }

    /// How many times the peer's throughput is Skyward's (larger is slower): the median of
    /// the pairs' ratios.
    pub fn slowdown(&self) -> f64 {
        let ratios: Vec<f64> = self
            .sky
            .iter()
            .zip(&self.peer)
            .map(|(sky, peer)| peer / sky.max(f64::MIN_POSITIVE))
            .collect();
        median(&ratios)
    }

    /// Skyward's share of the peer's throughput: the inverse of [`Pairs::slowdown`].
    pub fn share(&self) -> f64 {
        1.0 / self.slowdown().max(f64::MIN_POSITIVE)
    }

    pub fn sky_median(&self) -> f64 {
        median(&self.sky)
    }

    pub fn peer_median(&self) -> f64 {
        median(&self.peer)
    }
}

pub fn median_duration(values: &[Duration]) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// `12,345` for 12345.4.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&samples, 50.0), Duration::from_micros(50));
        assert_eq!(percentile(&samples, 99.0), Duration::from_micros(99));
        assert_eq!(percentile(&samples[..1], 99.0), Duration::from_micros(1));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn medians_and_formatting() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
    }

    #[test]
    fn pairs_are_compared_by_the_median_of_their_ratios() {
        let mut pairs = Pairs::default();
        // A recorded run's three pairs: medians taken apart compare 131 with 170 (1.30x),
        // although that 170 ran beside a Skyward run as slow as the one beside 157.
        for (sky, peer) in [(131.0, 170.0), (168.0, 184.0), (131.0, 157.0)] {
            pairs.push(sky, peer);
        }
        assert_eq!(pairs.sky_median(), 131.0);
        assert_eq!(pairs.peer_median(), 170.0);
        assert!((pairs.slowdown() - 157.0 / 131.0).abs() < 1e-12);
        assert!((pairs.share() - 131.0 / 157.0).abs() < 1e-12);
        assert_eq!(Pairs::default().slowdown(), 0.0);
    }
}
