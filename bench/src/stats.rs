//! Latency summaries (percentiles over nanosecond samples) used by every scenario.

use serde::Serialize;

/// p50/p99/max of a set of samples, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    /// Summarises nanosecond samples (sorted in place).
    pub fn of_ns(samples: &mut [u64]) -> Summary {
        if samples.is_empty() {
            return Summary::default();
        }
        samples.sort_unstable();
        let n = samples.len();
        let pick = |q: f64| {
            let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            samples[i] as f64 / 1e6
        };
        let sum: u128 = samples.iter().map(|&v| v as u128).sum();
        Summary {
            n,
            p50: pick(0.50),
            p99: pick(0.99),
            max: samples[n - 1] as f64 / 1e6,
            mean: (sum as f64 / n as f64) / 1e6,
        }
    }

    /// Summarises microsecond samples (pgbench's per-transaction log).
    pub fn of_us(samples: &mut [u64]) -> Summary {
        let mut ns: Vec<u64> = samples.iter().map(|v| v * 1000).collect();
        Summary::of_ns(&mut ns)
    }
}
