//! Peak-EWMA: a moving average of latency that jumps up at once and decays slowly.

use std::time::{Duration, Instant};

/// A latency estimate that follows a rise at once (the peak) and a fall gradually, with time
/// constant `decay` (the same rule as tower's `PeakEwma` and Finagle's).
#[derive(Debug, Clone)]
pub(crate) struct PeakEwma {
    estimate: f64,
    last: Instant,
    decay: f64,
}

impl PeakEwma {
    pub(crate) fn new(initial: Duration, decay: Duration, now: Instant) -> Self {
        Self {
            estimate: initial.as_secs_f64(),
            last: now,
            decay: decay.as_secs_f64().max(f64::MIN_POSITIVE),
        }
    }

    /// Folds in a sample taken at `now`.
    pub(crate) fn observe(&mut self, sample: Duration, now: Instant) {
        let sample = sample.as_secs_f64();
        if sample > self.estimate {
            self.estimate = sample;
        } else {
            let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
            let weight = (-elapsed / self.decay).exp();
            self.estimate = self.estimate * weight + sample * (1.0 - weight);
        }
        self.last = now;
    }

    /// The current estimate.
    pub(crate) fn get(&self) -> Duration {
        Duration::from_secs_f64(self.estimate)
    }
}

/// A penalty that fades exponentially with time constant `decay`.
#[derive(Debug, Clone)]
pub(crate) struct Penalty {
    value: f64,
    at: Instant,
    decay: f64,
}

impl Penalty {
    pub(crate) fn new(decay: Duration, now: Instant) -> Self {
        Self {
            value: 0.0,
            at: now,
            decay: decay.as_secs_f64().max(f64::MIN_POSITIVE),
        }
    }

    pub(crate) fn get(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.value * (-elapsed / self.decay).exp()
    }

    pub(crate) fn add(&mut self, amount: Duration, now: Instant) {
        self.value = self.get(now) + amount.as_secs_f64();
        self.at = now;
    }

    /// Halves what is left of the penalty (a success: one is not enough to forget failures).
    pub(crate) fn halve(&mut self, now: Instant) {
        self.value = self.get(now) / 2.0;
        self.at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_at_once_and_decays_slowly() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(Duration::from_millis(5), Duration::from_secs(10), t0);
        e.observe(Duration::from_millis(50), t0);
        assert_eq!(e.get(), Duration::from_millis(50));
        // One time constant later a low sample moves the estimate about 63 % of the way.
        e.observe(Duration::from_millis(1), t0 + Duration::from_secs(10));
        let ms = e.get().as_secs_f64() * 1000.0;
        assert!((18.0..20.0).contains(&ms), "{ms}");
    }

    #[test]
    fn penalties_fade() {
        let t0 = Instant::now();
        let mut p = Penalty::new(Duration::from_secs(10), t0);
        p.add(Duration::from_secs(1), t0);
        p.add(Duration::from_secs(1), t0);
        assert!((p.get(t0) - 2.0).abs() < 1e-9);
        assert!(p.get(t0 + Duration::from_secs(30)) < 0.11);
        p.halve(t0);
        assert!((p.get(t0) - 1.0).abs() < 1e-9);
    }
}
