//! The results: one row per (workload, step, tool), the engine's targets checked against
//! rsync's figures from the same run, rendered as markdown (for docs/benchmarks.md) and JSON.

use std::fmt::Write as _;

use crate::tools::Outcome;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub workload: &'static str,
    pub step: &'static str,
    pub tool: &'static str,
    pub source_bytes: u64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkloadInfo {
    pub name: &'static str,
    pub bytes: u64,
    pub files: u64,
    pub generate_seconds: f64,
}

/// Whether a tool's destination mirrors the source after the last step (same root digest).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Verification {
    pub workload: &'static str,
    pub tool: &'static str,
    pub mirrors: bool,
    /// Checked by contents and structure only (the tool cannot keep sub-second times).
    pub contents_only: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Target {
    pub target: String,
    pub measured: String,
    /// None when a run it needs was not part of this bench.
    pub met: Option<bool>,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub command: String,
    pub machine: Vec<(String, String)>,
    pub scale: f64,
    pub seed: u64,
    pub compress: String,
    pub caches_dropped: bool,
    pub workloads: Vec<WorkloadInfo>,
    pub rows: Vec<Row>,
    pub verification: Vec<Verification>,
    pub targets: Vec<Target>,
}

impl Report {
    fn find(&self, workload: &str, step: &str, tool: &str) -> Option<&Outcome> {
        self.rows
            .iter()
            .find(|r| r.workload == workload && r.step == step && r.tool == tool)
            .map(|r| &r.outcome)
            .filter(|o| o.error.is_none())
    }

    /// Checks the engine's targets against rsync's figures from this run.
    pub fn check_targets(&mut self, avg_chunk: u64) {
        let mut out = Vec::new();
        let pair = |w, s| {
            self.find(w, s, "replicator")
                .zip(self.find(w, s, "rsync"))
                .map(|(r, s)| (r.clone(), s.clone()))
        };
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::INFINITY };
        let mut push = |target: &str, measured: Option<(String, bool)>| {
            out.push(Target {
                target: target.into(),
                measured: measured
                    .as_ref()
                    .map_or_else(|| "not run".into(), |m| m.0.clone()),
                met: measured.map(|m| m.1),
            });
        };
        push(
            "tree, full: throughput >= 1.2x rsync's",
            pair("tree", "full").map(|(r, s)| {
                let x = ratio(s.wall_seconds, r.wall_seconds);
                (format!("{x:.2}x"), x >= 1.2)
            }),
        );
        push(
            "tree, 1% edit: wall time <= 0.5x rsync's",
            pair("tree", "edit-1pct").map(|(r, s)| {
                let x = ratio(r.wall_seconds, s.wall_seconds);
                (format!("{x:.2}x"), x <= 0.5)
            }),
        );
        push(
            "tree, 1% edit: bytes on the wire <= 0.5x rsync's",
            pair("tree", "edit-1pct").map(|(r, s)| {
                let x = ratio(r.wire_bytes as f64, s.wire_bytes as f64);
                (format!("{x:.2}x"), x <= 0.5)
            }),
        );
        push(
            "tree, 1 KiB insertion: chunk data sent <= 2 chunks' worth",
            self.find("tree", "insert-1k", "replicator").map(|r| {
                let sent = r.payload_bytes.unwrap_or(u64::MAX);
                (
                    format!(
                        "{} of chunk data in {} chunks ({} on the wire in all, manifest included)",
                        bytes(sent),
                        r.chunks_sent.unwrap_or(0),
                        bytes(r.wire_bytes)
                    ),
                    sent <= 2 * avg_chunk,
                )
            }),
        );
        push(
            "tree, nothing changed: wall time <= 0.5x rsync's",
            pair("tree", "no-change").map(|(r, s)| {
                let x = ratio(r.wall_seconds, s.wall_seconds);
                (format!("{x:.2}x"), x <= 0.5)
            }),
        );
        push(
            "image, 16 random writes: >= 2x faster than rsync --inplace",
            pair("image", "writes-16x64k").map(|(r, s)| {
                let x = ratio(s.wall_seconds, r.wall_seconds);
                (format!("{x:.2}x"), x >= 2.0)
            }),
        );
        push(
            "many-files, full: peak RSS of each end <= rsync's",
            pair("many-files", "full").map(|(r, s)| {
                let c = ratio(
                    r.client.peak_rss_bytes as f64,
                    s.client.peak_rss_bytes as f64,
                );
                let v = ratio(
                    r.server.peak_rss_bytes as f64,
                    s.server.peak_rss_bytes as f64,
                );
                (
                    format!("sender {c:.2}x, receiver {v:.2}x"),
                    c <= 1.0 && v <= 1.0,
                )
            }),
        );
        push(
            "many-files, full: wall time <= rsync's",
            pair("many-files", "full").map(|(r, s)| {
                let x = ratio(r.wall_seconds, s.wall_seconds);
                (format!("{x:.2}x"), x <= 1.0)
            }),
        );
        self.targets = out;
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "Command: `{}`\n", self.command);
        let _ = writeln!(
            md,
            "Scale {}, seed {}, replicator `--compress {}`, page cache {} before each run.\n",
            self.scale,
            self.seed,
            self.compress,
            if self.caches_dropped {
                "dropped"
            } else {
                "NOT dropped (warm runs)"
            }
        );
        md.push_str("| machine | |\n|---|---|\n");
        for (k, v) in &self.machine {
            let _ = writeln!(md, "| {k} | {v} |");
        }
        for w in &self.workloads {
            let _ = writeln!(
                md,
                "\n### {} — {} in {} files (generated in {:.0} s)\n",
                w.name,
                bytes(w.bytes),
                w.files,
                w.generate_seconds
            );
            md.push_str(
                "| step | tool | wall | rate | CPU, both ends | peak RSS sender / receiver \
                 | on the wire | wall vs rsync | wire vs rsync |\n\
                 |---|---|---:|---:|---:|---:|---:|---:|---:|\n",
            );
            for r in self.rows.iter().filter(|r| r.workload == w.name) {
                md.push_str(&self.row_markdown(r));
            }
        }
        md.push_str("\n### Verification\n\n| workload | tool | destination mirrors the source |\n|---|---|---|\n");
        for v in &self.verification {
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                v.workload,
                v.tool,
                match (v.mirrors, v.contents_only) {
                    (true, false) => "yes (same root digest)",
                    (true, true) => "same contents (times differ)",
                    (false, _) => "NO",
                }
            );
        }
        if self.verification.iter().any(|v| v.contents_only) {
            md.push_str(
                "\ntar's archive format keeps whole-second file times, so a tar copy's digest \
                 differs from the source's even where every byte is the same; its copy is \
                 checked with `diff -r` (names, types, contents).\n",
            );
        }
        md.push_str("\n### Targets\n\n| target | measured | met |\n|---|---|---|\n");
        for t in &self.targets {
            let met = match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            };
            let _ = writeln!(md, "| {} | {} | {met} |", t.target, t.measured);
        }
        md
    }

    fn row_markdown(&self, r: &Row) -> String {
        let o = &r.outcome;
        if let Some(e) = &o.error {
            return format!("| {} | {} | failed: {e} | | | | | | |\n", r.step, r.tool);
        }
        let rate = if r.step == "full" {
            format!("{:.0} MB/s", r.source_bytes as f64 / o.wall_seconds / 1e6)
        } else {
            "—".into()
        };
        let (vs_wall, vs_wire) = match self.find(r.workload, r.step, "rsync") {
            Some(s) if r.tool != "rsync" => (
                format!("{:.2}x", o.wall_seconds / s.wall_seconds),
                format!("{:.2}x", o.wire_bytes as f64 / s.wire_bytes.max(1) as f64),
            ),
            _ => ("".into(), "".into()),
        };
        format!(
            "| {} | {} | {:.2} s | {rate} | {:.2} s | {} / {} | {} | {vs_wall} | {vs_wire} |\n",
            r.step,
            r.tool,
            o.wall_seconds,
            o.client.cpu_seconds + o.server.cpu_seconds,
            mib(o.client.peak_rss_bytes),
            mib(o.server.peak_rss_bytes),
            bytes(o.wire_bytes),
        )
    }
}

fn mib(n: u64) -> String {
    format!("{:.0} MiB", n as f64 / (1 << 20) as f64)
}

/// Decimal units, as link speeds are quoted.
pub fn bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::Usage;

    fn row(workload: &'static str, step: &'static str, tool: &'static str, wall: f64) -> Row {
        let usage = Usage {
            cpu_seconds: 1.0,
            peak_rss_bytes: 50 << 20,
            exit_code: Some(0),
        };
        Row {
            workload,
            step,
            tool,
            source_bytes: 1_000_000_000,
            outcome: Outcome {
                wall_seconds: wall,
                client: usage,
                server: usage,
                wire_bytes: (wall * 1e8) as u64,
                payload_bytes: Some(100_000),
                chunks_sent: Some(2),
                error: None,
            },
        }
    }

    fn report(rows: Vec<Row>) -> Report {
        Report {
            command: "transfer-bench".into(),
            machine: vec![("cores".into(), "2".into())],
            scale: 1.0,
            seed: 1,
            compress: "auto".into(),
            caches_dropped: true,
            workloads: vec![WorkloadInfo {
                name: "tree",
                bytes: 1_000_000_000,
                files: 10,
                generate_seconds: 1.0,
            }],
            rows,
            verification: vec![],
            targets: vec![],
        }
    }

    #[test]
    fn targets_compare_with_rsync_from_the_same_run() {
        let mut r = report(vec![
            row("tree", "full", "replicator", 4.0),
            row("tree", "full", "rsync", 6.0),
            row("tree", "edit-1pct", "replicator", 1.0),
            row("tree", "edit-1pct", "rsync", 1.5),
            row("tree", "insert-1k", "replicator", 0.3),
        ]);
        r.check_targets(64 * 1024);
        let t = |name: &str| {
            r.targets
                .iter()
                .find(|t| t.target.starts_with(name))
                .expect("target")
                .clone()
        };
        assert_eq!(t("tree, full").met, Some(true), "6/4 = 1.5x");
        assert_eq!(t("tree, full").measured, "1.50x");
        assert_eq!(t("tree, 1% edit: wall").met, Some(false), "1/1.5 = 0.67x");
        assert_eq!(t("tree, 1 KiB insertion").met, Some(true));
        assert_eq!(t("image").met, None, "not run");
        let md = r.markdown();
        assert!(
            md.contains("| full | replicator | 4.00 s | 250 MB/s |"),
            "{md}"
        );
        assert!(md.contains("0.67x"), "{md}");
        assert!(
            md.contains(
                "| image, 16 random writes: >= 2x faster than rsync --inplace | not run | — |"
            ),
            "{md}"
        );
    }

    #[test]
    fn a_failed_run_is_shown_and_not_compared() {
        let mut failed = row("tree", "full", "rsync", 6.0);
        failed.outcome.error = Some("rsync exited with code 12".into());
        let mut r = report(vec![row("tree", "full", "replicator", 4.0), failed]);
        r.check_targets(64 * 1024);
        assert_eq!(r.targets[0].met, None);
        assert!(r.markdown().contains("failed: rsync exited with code 12"));
    }
}
