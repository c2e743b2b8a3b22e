//! Whether to zstd a chunk before it goes on the wire, and how hard.
//!
//! Compression pays when the link is the bottleneck and costs when the CPU is: zstd-1 does
//! ~0.4 GB/s per core on binaries, less than a fast LAN or loopback carries, far more than a
//! WAN does. `auto` therefore measures instead of guessing: it sends one window of chunks at
//! zstd level 3, one raw, one at level 1 and one raw again, keeps whichever moved more source
//! bytes per second, and tries again every few windows because the data and the link change
//! during a sync. The rate also swings with the data itself (on loopback, from ~90 MB/s for
//! cold small files to ~1.2 GB/s for large ones), so each compressed window is compared with
//! the better of the raw windows on either side of it, and must beat it by [`MARGIN`]:
//! a compressed window that happened to fall on easy data no longer wins.
//!
//! The rate is what the sender hands to the transport per second; the transport blocks
//! when the link is full, so the rate reflects the link when the link is the limit and the
//! CPU otherwise. Level 3 goes first in an incremental: a sync smaller than a window (most
//! incrementals) is sent at it, since there the bytes cost more than the milliseconds of
//! CPU. A first copy is large and starts with level 1 against raw instead.
//!
//! After raw wins, a drop in rate starts a new round only with evidence that compressing
//! could help: the sender spent at least a quarter of the window waiting for the transport
//! to take its chunks (the link may be the limit), and raw fell below the rate the last
//! round's compressed windows reached (the most compressing is known to manage). Without
//! that, on loopback the rate of raw windows swings with the data (cold small files, then
//! large ones), which used to start a losing trial every second or so.
//!
//! No I/O here: the caller reports each chunk sent with the time, so the policy is tested
//! with a synthetic clock.

use std::time::{Duration, Instant};

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

/// zstd's level for bulk data: ~0.4 GB/s per core on binaries, ~0.25 GB/s on text.
pub const FAST: i32 = 1;
/// zstd's own default level: ~7% smaller than [`FAST`] on text for ~25% more CPU. It is tried
/// first, so a small sync (an incremental of a few MiB, done within one trial window) goes at
/// it: there the bytes are what costs, and the extra CPU is a few milliseconds.
pub const STRONG: i32 = 3;

/// The encodings a trial round compares, in order: `Some(level)` is zstd at that level,
/// `None` is raw. The first round, and any after compression won, tries both levels; after
/// raw won (a fast link, or the CPU the limit: loopback) a round tries level 1 and raw only,
/// which keeps level 3's CPU off long copies where compression does not pay at all.
/// Every compressed trial is followed by a raw one, its comparison on the data after it.
const EVERY_LEVEL: &[Option<i32>] = &[Some(STRONG), None, Some(FAST), None];
const FAST_OR_RAW: &[Option<i32>] = &[Some(FAST), None];
/// The longest round.
const MAX_TRIALS: usize = EVERY_LEVEL.len();
/// How much faster than the raw windows around it a compressed window must be to win.
const MARGIN: f64 = 1.3;
/// Source bytes per trial window.
const WINDOW_BYTES: u64 = 32 << 20;
/// Windows spent on the winner before trying again; doubled each time the same encoding
/// wins again (up to [`MAX_KEEP_WINDOWS`]), so a steady link costs few losing trials.
const KEEP_WINDOWS: u32 = 8;
const MAX_KEEP_WINDOWS: u32 = 64;
/// A kept window slower than this fraction of the winning rate starts a new trial.
const CHANGED: f64 = 0.6;
/// The share of a window spent waiting for the transport above which the link, not the
/// sender's CPU or disk, is taken to be the limit.
const LINK_BOUND: f64 = 0.25;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// Sending a window as `trials[next]`; `rates` holds the windows already tried, and
    /// `raw_before` the rate of the window before the round if it went raw.
    Trying {
        trials: &'static [Option<i32>],
        next: usize,
        rates: [f64; MAX_TRIALS],
        raw_before: Option<f64>,
    },
    Keep {
        level: Option<i32>,
        windows_left: u32,
        /// The winning rate; a window far below it means the link changed: try again.
        rate: f64,
    },
}

impl Phase {
    /// A trial round of `trials`, after a window sent raw at `raw_before` if it was.
    fn trying(trials: &'static [Option<i32>], raw_before: Option<f64>) -> Phase {
        Phase::Trying {
            trials,
            next: 0,
            rates: [0.0; MAX_TRIALS],
            raw_before,
        }
    }
}

#[derive(Debug)]
pub struct CompressPolicy {
    mode: Compression,
    phase: Phase,
    window_start: Option<Instant>,
    window_bytes: u64,
    /// Time this window's chunks waited for the transport to take them.
    window_waited: Duration,
    /// The fastest compressed window of the last round.
    compressed_rate: f64,
    /// The last round's winner and how long it is kept.
    last_winner: Option<Option<i32>>,
    keep: u32,
    /// How many times auto switched encoding (for logs and tests).
    pub switches: u32,
}

impl CompressPolicy {
    pub fn new(mode: Compression) -> Self {
        CompressPolicy {
            mode,
            phase: Phase::trying(EVERY_LEVEL, None),
            window_start: None,
            window_bytes: 0,
            window_waited: Duration::ZERO,
            compressed_rate: 0.0,
            last_winner: None,
            keep: KEEP_WINDOWS,
            switches: 0,
        }
    }

    /// The policy for a streamed first copy into an empty destination: a large transfer,
    /// so its first round tries level 1 against raw, not level 3 first. Level 3 costs ~4
    /// times level 1's CPU and wins only where compression pays at all; it is tried in the
    /// round after level 1 wins.
    pub fn for_first_copy(mode: Compression) -> Self {
        CompressPolicy {
            phase: Phase::trying(FAST_OR_RAW, None),
            ..CompressPolicy::new(mode)
        }
    }

    /// The zstd level for the next chunk, or `None` to send it raw.
    pub fn level(&self) -> Option<i32> {
        match self.mode {
            Compression::Never => None,
            Compression::Always => Some(FAST),
            Compression::Auto => match self.phase {
                Phase::Trying { trials, next, .. } => trials[next],
                Phase::Keep { level, .. } => level,
            },
        }
    }

    /// Records that a chunk of `raw_len` source bytes was handed to the transport at `now`,
    /// after waiting `waited` for it to take the chunk.
    pub fn sent(&mut self, raw_len: u64, waited: Duration, now: Instant) {
        if self.mode != Compression::Auto {
            return;
        }
        let start = *self.window_start.get_or_insert(now);
        self.window_bytes += raw_len;
        self.window_waited += waited;
        if self.window_bytes < WINDOW_BYTES {
            return;
        }
        let secs = now.duration_since(start).as_secs_f64().max(1e-6);
        let rate = self.window_bytes as f64 / secs;
        let waited = self.window_waited.as_secs_f64() / secs;
        let link_bound = waited >= LINK_BOUND;
        tracing::trace!(
            level = self.level().unwrap_or(0),
            mb_s = rate / 1e6,
            waited,
            "compression window"
        );
        self.window_start = Some(now);
        self.window_bytes = 0;
        self.window_waited = Duration::ZERO;
        let before = self.level();
        self.phase = match self.phase {
            Phase::Trying {
                trials,
                next,
                mut rates,
                raw_before,
            } => {
                rates[next] = rate;
                if next + 1 < trials.len() {
                    Phase::Trying {
                        trials,
                        next: next + 1,
                        rates,
                        raw_before,
                    }
                } else {
                    let (level, rate) = winner(trials, &rates, raw_before);
                    self.compressed_rate = trials
                        .iter()
                        .zip(rates)
                        .filter(|(level, _)| level.is_some())
                        .fold(0.0, |max, (_, rate)| rate.max(max));
                    self.keep_winner(level, rate)
                }
            }
            // Raw won and the link has room: compressing cannot send faster.
            keep @ Phase::Keep { level: None, .. } if !link_bound => keep,
            // A drop starts a round, unless raw is kept and still faster than the last
            // round's compressed windows went: their rate is what compressing can reach.
            Phase::Keep {
                level,
                rate: kept_rate,
                ..
            } if rate < kept_rate * CHANGED && (level.is_some() || rate < self.compressed_rate) => {
                self.keep = KEEP_WINDOWS;
                self.new_round(level.is_none().then_some(rate))
            }
            Phase::Keep {
                level,
                windows_left,
                rate: kept_rate,
            } if windows_left > 1 => Phase::Keep {
                level,
                windows_left: windows_left - 1,
                rate: kept_rate,
            },
            Phase::Keep { level, .. } => self.new_round(level.is_none().then_some(rate)),
        };
        if self.level() != before {
            self.switches += 1;
        }
    }

    /// Starts a trial round: both levels unless raw won the last one. `raw_before` is the
    /// rate of the window just sent if it went raw.
    fn new_round(&self, raw_before: Option<f64>) -> Phase {
        let trials = match self.last_winner {
            Some(None) => FAST_OR_RAW,
            _ => EVERY_LEVEL,
        };
        Phase::trying(trials, raw_before)
    }

    /// Ends a round: keeps `level` for a number of windows, longer if it won the last round
    /// too.
    fn keep_winner(&mut self, level: Option<i32>, rate: f64) -> Phase {
        tracing::debug!(
            level = level.unwrap_or(0),
            mb_s = rate / 1e6,
            "compression trial won (level 0: raw)"
        );
        self.keep = if self.last_winner == Some(level) {
            (self.keep * 2).min(MAX_KEEP_WINDOWS)
        } else {
            KEEP_WINDOWS
        };
        self.last_winner = Some(level);
        Phase::Keep {
            level,
            windows_left: self.keep,
            rate,
        }
    }
}

/// A round's winner and its rate: the compressed level that beat the raw windows around it
/// by the widest factor, if that factor reaches [`MARGIN`]; raw otherwise, at the mean rate
/// of its windows.
fn winner(
    trials: &[Option<i32>],
    rates: &[f64; MAX_TRIALS],
    raw_before: Option<f64>,
) -> (Option<i32>, f64) {
    let raw_at = |i: usize| (trials.get(i) == Some(&None)).then(|| rates[i]);
    let mut best: Option<(i32, f64, f64)> = None;
    for (i, level) in trials.iter().enumerate() {
        let Some(level) = *level else { continue };
        let before = if i == 0 { raw_before } else { raw_at(i - 1) };
        let around = before.into_iter().chain(raw_at(i + 1)).fold(0.0, f64::max);
        let gain = rates[i] / around.max(1e-9);
        if best.is_none_or(|(_, g, _)| gain > g) {
            best = Some((level, gain, rates[i]));
        }
    }
    match best {
        Some((level, gain, rate)) if gain >= MARGIN => (Some(level), rate),
        _ => {
            let raw: Vec<f64> = (0..trials.len()).filter_map(raw_at).collect();
            (None, raw.iter().sum::<f64>() / raw.len().max(1) as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: u64 = 64 << 10;

    /// Sends `total` bytes through the policy over a link where a chunk takes `cost(level)`,
    /// half of it waiting for the link; returns the share of chunks sent at each of: raw,
    /// level 1, level 3.
    fn run_levels(
        policy: &mut CompressPolicy,
        total: u64,
        cost: impl Fn(Option<i32>) -> Duration,
    ) -> [f64; 3] {
        run_on(policy, total, |_, level| (cost(level), cost(level) / 2))
    }

    /// [`run_levels`] where the `i`th chunk takes `cost(i, level)`: (time, of it waiting).
    fn run_on(
        policy: &mut CompressPolicy,
        total: u64,
        cost: impl Fn(u64, Option<i32>) -> (Duration, Duration),
    ) -> [f64; 3] {
        let mut now = Instant::now();
        let mut counts = [0u64; 3];
        for i in 0..total / CHUNK {
            let level = policy.level();
            let (took, waited) = cost(i, level);
            now += took;
            counts[column(level)] += 1;
            policy.sent(CHUNK, waited, now);
        }
        let all = (total / CHUNK) as f64;
        counts.map(|c| c as f64 / all)
    }

    /// Where an encoding goes in the tests' triples: raw, level 1, level 3.
    fn column(level: Option<i32>) -> usize {
        match level {
            None => 0,
            Some(FAST) => 1,
            Some(_) => 2,
        }
    }

    /// A link where a chunk takes `micros` raw, at level 1, at level 3.
    fn link(micros: [u64; 3]) -> impl Fn(Option<i32>) -> Duration {
        move |level| Duration::from_micros(micros[column(level)])
    }

    /// [`run_levels`] where both levels cost `compressed`: the share of compressed chunks.
    fn run(policy: &mut CompressPolicy, total: u64, compressed: Duration, raw: Duration) -> f64 {
        let [raw_share, ..] = run_levels(policy, total, |level| match level {
            None => raw,
            Some(_) => compressed,
        });
        1.0 - raw_share
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
    fn auto_picks_the_level_the_link_favours() {
        // A slow link: level 3 sends 7% fewer bytes, and the CPU keeps up with both levels.
        let slow = link([655, 262, 244]);
        let [_, fast, strong] =
            run_levels(&mut CompressPolicy::new(Compression::Auto), 4 << 30, slow);
        assert!(strong > 0.85 && fast < 0.1, "{strong} {fast}");
        // A faster link where level 3's CPU is the limit and level 1 still pays.
        let mid = link([300, 200, 280]);
        let [_, fast, strong] =
            run_levels(&mut CompressPolicy::new(Compression::Auto), 4 << 30, mid);
        assert!(fast > 0.85 && strong < 0.1, "{fast} {strong}");
    }

    #[test]
    fn after_raw_wins_level_3_is_not_tried_again() {
        // Loopback: every compressed window is slower than raw, level 3 slowest.
        let cpu_bound = link([120, 180, 230]);
        let mut p = CompressPolicy::new(Compression::Auto);
        let [raw, _, strong] = run_levels(&mut p, 4 << 30, cpu_bound);
        assert!(raw > 0.8, "{raw}");
        // Only the first round's window went at level 3.
        assert_eq!(strong, WINDOW_BYTES as f64 / (4u64 << 30) as f64);
    }

    #[test]
    fn data_that_changes_speed_does_not_make_compression_win() {
        // Loopback, where compression costs 20% more per chunk, over data that alternates
        // every two windows between slow (cold small files) and fast (large files). A
        // compressed trial that fell on the last fast window, compared with a raw one on
        // slow data after it, used to win and be kept for eight windows or more. Compared
        // with the better of its raw neighbours, it loses: every compressed window is a
        // lone trial.
        let chunks_per_window = WINDOW_BYTES / CHUNK;
        let mut p = CompressPolicy::new(Compression::Auto);
        let mut now = Instant::now();
        let (mut run, mut longest, mut compressed) = (0, 0, 0);
        for i in 0..(8u64 << 30) / CHUNK {
            let level = p.level();
            let raw = if (i / chunks_per_window / 2) % 2 == 0 {
                300
            } else {
                50
            };
            let took = Duration::from_micros(if level.is_some() { raw * 6 / 5 } else { raw });
            now += took;
            p.sent(CHUNK, took / 2, now);
            if i % chunks_per_window == 0 {
                run = if level.is_some() { run + 1 } else { 0 };
                longest = longest.max(run);
                compressed += u32::from(level.is_some());
            }
        }
        // The first round's two windows and one per round on expiry (after 8, 16, 32, then
        // every 64 windows); drops back to slow data start none, since raw stays faster
        // than compressing went. Before, each drop did: 68 of the 256 windows.
        assert!(compressed <= 8, "{compressed} compressed windows");
        // The first round's level 3 and level 1 windows have a raw one between them.
        assert_eq!(longest, 1);
        assert_eq!(p.last_winner, Some(None));
    }

    #[test]
    fn raw_stays_while_the_sender_does_not_wait_for_the_link() {
        // The sender's own work is the limit (it never waits), and its rate swings: after
        // the first round no window is compressed, however often the rate drops.
        let chunks_per_window = WINDOW_BYTES / CHUNK;
        let busy = |i: u64, level: Option<i32>| {
            let raw = if (i / chunks_per_window) % 3 == 0 {
                400
            } else {
                100
            };
            let took = Duration::from_micros(if level.is_some() { raw * 2 } else { raw });
            (took, Duration::ZERO)
        };
        let total = 4u64 << 30;
        let mut p = CompressPolicy::new(Compression::Auto);
        let [_, fast, strong] = run_on(&mut p, total, busy);
        let one_window = WINDOW_BYTES as f64 / total as f64;
        assert_eq!((fast, strong), (one_window, one_window));
    }

    #[test]
    fn a_first_copy_tries_level_3_only_where_compression_pays() {
        let total = 4u64 << 30;
        // Loopback: level 1 is tried and loses, level 3 is never sent.
        let cpu_bound = link([120, 180, 230]);
        let mut p = CompressPolicy::for_first_copy(Compression::Auto);
        let [raw, _, strong] = run_levels(&mut p, total, cpu_bound);
        assert_eq!(strong, 0.0);
        assert!(raw > 0.9, "{raw}");
        // A slow link: level 1 wins the first round, level 3 wins the next and is kept.
        let slow = link([655, 262, 244]);
        let mut p = CompressPolicy::for_first_copy(Compression::Auto);
        let [raw, fast, strong] = run_levels(&mut p, total, slow);
        assert!(strong > 0.8 && raw < 0.1, "{raw} {fast} {strong}");
    }

    #[test]
    fn a_sync_smaller_than_a_window_goes_at_the_strong_level() {
        let mut p = CompressPolicy::new(Compression::Auto);
        let shares = run_levels(&mut p, WINDOW_BYTES - CHUNK, |_| Duration::from_micros(100));
        assert_eq!(shares, [0.0, 0.0, 1.0]);
        assert_eq!(p.switches, 0);
        // `always` is level 1 throughout, `never` raw.
        let always = run_levels(
            &mut CompressPolicy::new(Compression::Always),
            4 * WINDOW_BYTES,
            |_| Duration::from_micros(100),
        );
        assert_eq!(always, [0.0, 1.0, 0.0]);
    }

    #[test]
    fn parse_names() {
        assert_eq!(Compression::parse("auto"), Some(Compression::Auto));
        assert_eq!(Compression::parse("never"), Some(Compression::Never));
        assert_eq!(Compression::parse("always"), Some(Compression::Always));
        assert_eq!(Compression::parse("sometimes"), None);
    }
}
