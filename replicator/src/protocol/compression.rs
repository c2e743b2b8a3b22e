//! Whether to zstd a chunk before it goes on the wire.
//!
//! Compression pays when the link is the bottleneck and costs when the CPU is: zstd-1 does
//! ~0.4 GB/s per core on binaries, less than a fast LAN or loopback carries, far more than a
//! WAN does. `auto` therefore measures instead of guessing: it sends one window of chunks
//! compressed and one raw, keeps whichever moved more source bytes per second, and tries
//! again every few windows because the data and the link change during a sync. The rate is
//! what the sender hands to the transport per second; the transport blocks when the link is
//! full, so the rate reflects the link when the link is the limit and the CPU otherwise.
//!
//! No I/O here: the caller reports each chunk sent with the time, so the policy is tested
//! with a synthetic clock.

use std::time::Instant;

/// The `--compress` setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// Chunks go raw (local syncs: no wire to save).
    #[default]
    Never,
    /// Every chunk that shrinks goes compressed.
    Always,
    /// Measured at run time: compressed while that moves data faster.
    Auto,
}

impl Compression {
    pub fn parse(s: &str) -> Option<Compression> {
        match s {
            "never" => Some(Compression::Never),
            "always" => Some(Compression::Always),
            "auto" => Some(Compression::Auto),
            _ => None,
        }
    }
}

/// Source bytes per trial window.
const WINDOW_BYTES: u64 = 32 << 20;
/// Windows spent on the winner before trying both again; doubled each time the same side
/// wins again (up to [`MAX_KEEP_WINDOWS`]), so a steady link costs few losing trials.
const KEEP_WINDOWS: u32 = 8;
const MAX_KEEP_WINDOWS: u32 = 64;
/// A kept window slower than this fraction of the winning rate starts a new trial.
const CHANGED: f64 = 0.6;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    TryCompressed,
    TryRaw {
        compressed_rate: f64,
    },
    Keep {
        compress: bool,
        windows_left: u32,
        /// The winning rate; a window far below it means the link changed: try again.
        rate: f64,
    },
}

#[derive(Debug)]
pub struct CompressPolicy {
    mode: Compression,
    phase: Phase,
    window_start: Option<Instant>,
    window_bytes: u64,
    /// The last trial's winner and how long it is kept.
    last_winner: Option<bool>,
    keep: u32,
    /// How many times auto switched between compressed and raw (for logs and tests).
    pub switches: u32,
}

impl CompressPolicy {
    pub fn new(mode: Compression) -> Self {
        CompressPolicy {
            mode,
            phase: Phase::TryCompressed,
            window_start: None,
            window_bytes: 0,
            last_winner: None,
            keep: KEEP_WINDOWS,
            switches: 0,
        }
    }

    /// Whether the next chunk should be compressed.
    pub fn compress(&self) -> bool {
        match self.mode {
            Compression::Never => false,
            Compression::Always => true,
            Compression::Auto => match self.phase {
                Phase::TryCompressed => true,
                Phase::TryRaw { .. } => false,
                Phase::Keep { compress, .. } => compress,
            },
        }
    }

    /// Records that a chunk of `raw_len` source bytes was handed to the transport at `now`.
    pub fn sent(&mut self, raw_len: u64, now: Instant) {
        if self.mode != Compression::Auto {
            return;
        }
        let start = *self.window_start.get_or_insert(now);
        self.window_bytes += raw_len;
        if self.window_bytes < WINDOW_BYTES {
            return;
        }
        let secs = now.duration_since(start).as_secs_f64().max(1e-6);
        let rate = self.window_bytes as f64 / secs;
        self.window_start = Some(now);
        self.window_bytes = 0;
        let before = self.compress();
        self.phase = match self.phase {
            Phase::TryCompressed => Phase::TryRaw {
                compressed_rate: rate,
            },
            Phase::TryRaw { compressed_rate } => {
                let compress = compressed_rate >= rate;
                tracing::debug!(
                    compressed_mb_s = compressed_rate / 1e6,
                    raw_mb_s = rate / 1e6,
                    compress,
                    "compression trial"
                );
                self.keep = if self.last_winner == Some(compress) {
                    (self.keep * 2).min(MAX_KEEP_WINDOWS)
                } else {
                    KEEP_WINDOWS
                };
                self.last_winner = Some(compress);
                Phase::Keep {
                    compress,
                    windows_left: self.keep,
                    rate: compressed_rate.max(rate),
                }
            }
            Phase::Keep {
                rate: kept_rate, ..
            } if rate < kept_rate * CHANGED => {
                self.keep = KEEP_WINDOWS;
                Phase::TryCompressed
            }
            Phase::Keep {
                compress,
                windows_left,
                rate: kept_rate,
            } if windows_left > 1 => Phase::Keep {
                compress,
                windows_left: windows_left - 1,
                rate: kept_rate,
            },
            Phase::Keep { .. } => Phase::TryCompressed,
        };
        if self.compress() != before {
            self.switches += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const CHUNK: u64 = 64 << 10;

    /// Sends `total` bytes through the policy over a link where a compressed chunk takes
    /// `compressed` and a raw one `raw`; returns the fraction of chunks sent compressed.
    fn run(policy: &mut CompressPolicy, total: u64, compressed: Duration, raw: Duration) -> f64 {
        let mut now = Instant::now();
        let (mut on, mut all) = (0u64, 0u64);
        for _ in 0..total / CHUNK {
            let c = policy.compress();
            now += if c { compressed } else { raw };
            on += u64::from(c);
            all += 1;
            policy.sent(CHUNK, now);
        }
        on as f64 / all as f64
    }

    #[test]
    fn fixed_modes_never_change() {
        let mut p = CompressPolicy::new(Compression::Never);
        assert_eq!(
            run(
                &mut p,
                1 << 30,
                Duration::from_micros(1),
                Duration::from_millis(1)
            ),
            0.0
        );
        let mut p = CompressPolicy::new(Compression::Always);
        assert_eq!(
            run(
                &mut p,
                1 << 30,
                Duration::from_millis(1),
                Duration::from_micros(1)
            ),
            1.0
        );
    }

    #[test]
    fn auto_compresses_on_a_slow_link() {
        // 100 MB/s link, ratio 0.4: compressed chunks go 2.5x faster.
        let mut p = CompressPolicy::new(Compression::Auto);
        let share = run(
            &mut p,
            4 << 30,
            Duration::from_micros(262),
            Duration::from_micros(655),
        );
        assert!(share > 0.9, "{share}");
    }

    #[test]
    fn auto_sends_raw_when_the_cpu_is_the_limit() {
        // Loopback: compressing is slower than sending raw.
        let mut p = CompressPolicy::new(Compression::Auto);
        let share = run(
            &mut p,
            4 << 30,
            Duration::from_micros(180),
            Duration::from_micros(120),
        );
        assert!(share < 0.2, "{share}");
    }

    #[test]
    fn auto_follows_a_change_of_link() {
        let mut p = CompressPolicy::new(Compression::Auto);
        let fast = run(
            &mut p,
            1 << 30,
            Duration::from_micros(180),
            Duration::from_micros(120),
        );
        assert!(fast < 0.3, "{fast}");
        // The link slows down (say, another transfer starts): compression wins again.
        let slow = run(
            &mut p,
            3 << 30,
            Duration::from_micros(262),
            Duration::from_micros(655),
        );
        assert!(slow > 0.8, "{slow}");
        assert!(p.switches >= 2);
    }

    #[test]
    fn parse_names() {
        assert_eq!(Compression::parse("auto"), Some(Compression::Auto));
        assert_eq!(Compression::parse("never"), Some(Compression::Never));
        assert_eq!(Compression::parse("always"), Some(Compression::Always));
        assert_eq!(Compression::parse("sometimes"), None);
    }
}
