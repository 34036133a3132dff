//! A log-linear latency histogram: fixed memory, ~6% resolution, nanoseconds to seconds.

/// Sub-buckets per power of two.
const SUB: usize = 16;
// Row 0 holds 0..16 ns exactly; rows 1..=60 the powers of two 2^4..2^63.
const BUCKETS: usize = 61 * SUB;

/// Latency samples in nanoseconds.
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: Box::new([0; BUCKETS]),
            total: 0,
        }
    }
}

fn bucket(ns: u64) -> usize {
    if ns < SUB as u64 {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros() as usize; // ≥ 4
    let sub = ((ns >> (exp - 4)) & (SUB as u64 - 1)) as usize;
    ((exp - 3) * SUB + sub).min(BUCKETS - 1)
}

/// The smallest value that lands in bucket `b` (inverse of [`bucket`]).
fn low(b: usize) -> u64 {
    if b < SUB {
        return b as u64;
    }
    let exp = b / SUB + 3;
    let sub = (b % SUB) as u64;
    (1u64 << exp) | (sub << (exp - 4))
}

/// A [`Histogram`] that several threads may record into and read at any time (relaxed
/// counters: a snapshot taken while samples arrive may miss the latest few).
pub struct AtomicHistogram {
    counts: Box<[std::sync::atomic::AtomicU64]>,
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        AtomicHistogram {
            counts: (0..BUCKETS)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
        }
    }
}

impl std::fmt::Debug for AtomicHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AtomicHistogram({} samples)", self.snapshot().count())
    }
}

impl AtomicHistogram {
    /// Records one sample.
    pub fn record(&self, ns: u64) {
        self.counts[bucket(ns)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The samples so far.
    pub fn snapshot(&self) -> Histogram {
        let mut h = Histogram::default();
        for (a, b) in h.counts.iter_mut().zip(self.counts.iter()) {
            *a = b.load(std::sync::atomic::Ordering::Relaxed);
            h.total += *a;
        }
        h
    }
}

impl Histogram {
    /// Records one sample.
    pub fn record(&mut self, ns: u64) {
        self.counts[bucket(ns)] += 1;
        self.total += 1;
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Samples surely at most `ns`: those in buckets that lie wholly at or below it (a
    /// sample in the bucket `ns` cuts through is counted at the next bound asked).
    pub fn count_at_most(&self, ns: u64) -> u64 {
        self.counts
            .iter()
            .enumerate()
            .take(BUCKETS - 1)
            .take_while(|(b, _)| low(b + 1) - 1 <= ns)
            .map(|(_, &c)| c)
            .sum()
    }

    /// The samples' sum, estimated as each bucket's middle times its count (within the
    /// buckets' resolution), in nanoseconds.
    pub fn estimated_sum(&self) -> u64 {
        let mut sum = 0u128;
        for (b, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let hi = if b + 1 < BUCKETS { low(b + 1) } else { low(b) };
            sum += u128::from(c) * u128::from((low(b) + hi) / 2);
        }
        sum.min(u128::from(u64::MAX)) as u64
    }

    /// The value below which `p` (0..=1) of the samples fall, in nanoseconds (0 if empty).
    pub fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((self.total as f64 * p).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return low(b);
            }
        }
        low(BUCKETS - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_within_resolution() {
        let mut h = Histogram::default();
        for ns in 1..=10_000u64 {
            h.record(ns * 100);
        }
        let p50 = h.percentile(0.5) as f64;
        let p99 = h.percentile(0.99) as f64;
        assert!((p50 / 500_000.0 - 1.0).abs() < 0.07, "{p50}");
        assert!((p99 / 990_000.0 - 1.0).abs() < 0.07, "{p99}");
        for b in 0..BUCKETS - 1 {
            assert_eq!(bucket(low(b)), b);
        }
        // Cumulative counts at a bound never count a sample above it.
        let mut h = Histogram::default();
        for ns in [5u64, 999, 1000, 1001, 70_000, 2_000_000_000] {
            h.record(ns);
        }
        // 999 to 1001 share the bucket 992..1023: counted once the bound covers it whole.
        assert_eq!(h.count_at_most(1000), 1);
        assert_eq!(h.count_at_most(1023), 4);
        assert_eq!(h.count_at_most(100_000), 5);
        assert_eq!(h.count_at_most(u64::MAX - 1), 6);
        let sum = h.estimated_sum() as f64;
        assert!((sum / 2_000_073_005.0 - 1.0).abs() < 0.07, "{sum}");
    }
}
