//! Results model, the printed table, the JSON dump, the generated section of docs/benchmarks.md
//! and the chart (drawn by bench/plot.py).

use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Which direction of a metric is better.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Lower,
    Higher,
    /// Counts that must be zero, or information only.
    Neither,
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    pub orderpush: Option<f64>,
    pub node: Option<f64>,
    pub better: Better,
    /// The target this row is judged against, in words (bench/README.md lists them per scenario).
    pub target: Option<String>,
    /// Whether orderpush met it (None: not judged, e.g. not measured).
    pub met: Option<bool>,
    /// A stretch goal beyond the target, in words, and whether orderpush reached it.
    pub moonshot: Option<String>,
    pub moonshot_met: Option<bool>,
    /// Why the figure is not a valid measurement (e.g. the service left rows unnumbered); the
    /// status then says INVALID whatever the value.
    pub invalid: Option<String>,
    pub note: String,
}

impl Row {
    pub fn new(scenario: &str, metric: &str, unit: &str, better: Better) -> Row {
        Row {
            scenario: scenario.into(),
            metric: metric.into(),
            unit: unit.into(),
            orderpush: None,
            node: None,
            better,
            target: None,
            met: None,
            moonshot: None,
            moonshot_met: None,
            invalid: None,
            note: String::new(),
        }
    }
    pub fn op(mut self, v: Option<f64>) -> Row {
        self.orderpush = v;
        self
    }
    pub fn node(mut self, v: Option<f64>) -> Row {
        self.node = v;
        self
    }
    /// Judges orderpush's value with `ok`.
    pub fn target(mut self, text: &str, ok: impl Fn(f64) -> bool) -> Row {
        self.target = Some(text.into());
        self.met = self.orderpush.map(ok);
        self
    }
    /// Judges orderpush's value with `ok`, which may decline (None: e.g. the reference it
    /// compares with was not measured).
    pub fn target_if(mut self, text: &str, ok: impl Fn(f64) -> Option<bool>) -> Row {
        self.target = Some(text.into());
        self.met = self.orderpush.and_then(ok);
        self
    }
    /// A stretch goal, judged like the target.
    pub fn moonshot(mut self, text: &str, ok: impl Fn(f64) -> bool) -> Row {
        self.moonshot = Some(text.into());
        self.moonshot_met = self.orderpush.map(ok);
        self
    }
    /// Marks the figure as not a valid measurement, with the reason.
    pub fn invalid(mut self, why: Option<String>) -> Row {
        self.invalid = why;
        self
    }
    pub fn note(mut self, n: impl Into<String>) -> Row {
        self.note = n.into();
        self
    }
    /// How many times better orderpush is than Node (>1: orderpush better).
    pub fn advantage(&self) -> Option<f64> {
        let (o, n) = (self.orderpush?, self.node?);
        match self.better {
            Better::Lower if o > 0.0 && n > 0.0 => Some(n / o),
            Better::Higher if n > 0.0 && o > 0.0 => Some(o / n),
            _ => None,
        }
    }
}

/// Everything one run produced.
#[derive(Debug, Default, Serialize)]
pub struct Results {
    pub command: String,
    pub started: String,
    pub duration_s: f64,
    pub machine: BTreeMap<String, String>,
    pub rows: Vec<Row>,
    /// server -> [(connections, RSS MiB)]
    pub rss_curve: BTreeMap<String, Vec<(usize, f64)>>,
    /// server -> [(orders/s, p50, p99, max ms)] of commit -> POS.
    pub commit_latency: BTreeMap<String, Vec<(f64, f64, f64, f64)>>,
    /// server -> [(events/s offered, p50, p99, max ms)] of fan-out to the last client.
    pub fanout_latency: BTreeMap<String, Vec<(f64, f64, f64, f64)>>,
    /// config -> [(writers, tps)] of the write path.
    pub write_tps: BTreeMap<String, Vec<(usize, f64)>>,
    /// server -> [(clients, server CPU µs per delivery, of which user µs, system µs)] of the
    /// fan-out at saturation.
    pub fanout_cpu: BTreeMap<String, Vec<(usize, f64, f64, f64)>>,
    /// [(tenants, service cores at rest, Postgres cores at rest, service cores under load,
    /// Postgres cores under load)] of the tenants scenario.
    pub tenants_cpu: Vec<(usize, f64, f64, f64, f64)>,
    pub notes: Vec<String>,
}

fn fmt_num(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v.is_nan() => "–".into(),
        Some(v) if v.abs() >= 1000.0 => format!("{:.0}", v),
        Some(v) if v.abs() >= 100.0 => format!("{:.1}", v),
        Some(v) if v.fract() == 0.0 => format!("{:.0}", v),
        Some(v) if v.abs() >= 1.0 => format!("{:.2}", v),
        // Small figures (CPU cores at rest, µs) keep two significant digits or more.
        Some(v) if v.abs() >= 0.1 => format!("{:.3}", v),
        Some(v) => format!("{:.4}", v),
    }
}

fn status(r: &Row) -> &'static str {
    if r.invalid.is_some() {
        return "INVALID";
    }
    match (r.met, r.moonshot_met) {
        (Some(true), Some(true)) => "met, moonshot met",
        (Some(true), _) => "met",
        (Some(false), _) => "NOT met",
        (None, _) if r.target.is_some() => "not measured",
        (None, _) => "",
    }
}

/// The target column: the target and, if any, its moonshot.
fn target_text(r: &Row) -> String {
    match (&r.target, &r.moonshot) {
        (Some(t), Some(m)) => format!("{t} (moonshot {m})"),
        (Some(t), None) => t.clone(),
        (None, Some(m)) => format!("moonshot {m}"),
        (None, None) => String::new(),
    }
}

/// The note column, with the reason a figure is invalid first.
fn note_text(r: &Row) -> String {
    match &r.invalid {
        Some(why) if r.note.is_empty() => format!("INVALID: {why}"),
        Some(why) => format!("INVALID: {why}; {}", r.note),
        None => r.note.clone(),
    }
}

/// The table as plain text for the terminal.
pub fn print_table(res: &Results) {
    let mut lines = vec![[
        "scenario".to_string(),
        "metric".into(),
        "orderpush".into(),
        "node".into(),
        "op vs node".into(),
        "target".into(),
        "status".into(),
    ]];
    for r in &res.rows {
        lines.push([
            r.scenario.clone(),
            format!("{} [{}]", r.metric, r.unit),
            fmt_num(r.orderpush),
            fmt_num(r.node),
            r.advantage()
                .map(|a| format!("{a:.2}x"))
                .unwrap_or_default(),
            target_text(r),
            status(r).into(),
        ]);
    }
    let mut w = [0usize; 7];
    for l in &lines {
        for (i, c) in l.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    for (n, l) in lines.iter().enumerate() {
        let cells: Vec<String> = l
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", cells.join(" | ").trim_end());
        if n == 0 {
            println!(
                "{}",
                w.iter()
                    .map(|&x| "-".repeat(x))
                    .collect::<Vec<_>>()
                    .join("-+-")
            );
        }
    }
    for r in res.rows.iter().filter(|r| r.invalid.is_some()) {
        println!("INVALID: {} {}: {}", r.scenario, r.metric, note_text(r));
    }
    for n in &res.notes {
        println!("note: {n}");
    }
}

/// Markers around the generated part of docs/benchmarks.md; text outside them is kept.
const BEGIN: &str = "<!-- BEGIN GENERATED by orderpush-bench: do not edit by hand -->";
const END: &str = "<!-- END GENERATED -->";

/// The generated markdown section.
pub fn markdown(res: &Results, chart: Option<&str>) -> String {
    let mut s = String::new();
    s.push_str(&format!("{BEGIN}\n\n"));
    s.push_str(&format!(
        "Run of {} ({:.0} s), command:\n\n```sh\n{}\n```\n\n",
        res.started, res.duration_s, res.command
    ));
    s.push_str("Machine:\n\n");
    for (k, v) in &res.machine {
        s.push_str(&format!("- {k}: {v}\n"));
    }
    s.push_str(
        "\n\"op vs node\" is how many times better orderpush is than the Node baseline on that \
         line (above 1: orderpush better), measured in the same run with the same client code. \
         Targets (and moonshots, stretch goals beyond them) are judged on orderpush's figure; \
         INVALID marks a figure the run could not vouch for (the note says why).\n\n",
    );
    s.push_str("| scenario | metric | orderpush | node | op vs node | target | status | note |\n");
    s.push_str("|---|---|---:|---:|---:|---|---|---|\n");
    for r in &res.rows {
        s.push_str(&format!(
            "| {} | {} [{}] | {} | {} | {} | {} | {} | {} |\n",
            r.scenario,
            r.metric,
            r.unit,
            fmt_num(r.orderpush),
            fmt_num(r.node),
            r.advantage()
                .map(|a| format!("{a:.2}×"))
                .unwrap_or_default(),
            target_text(r),
            match status(r) {
                "" => String::new(),
                "not measured" => "not measured".into(),
                x => format!("**{x}**"),
            },
            note_text(r).replace('|', "\\|")
        ));
    }
    if let Some(c) = chart {
        s.push_str(&format!("\n![benchmark chart]({c})\n"));
    }
    if !res.notes.is_empty() {
        s.push_str("\nNotes from the run:\n\n");
        for n in &res.notes {
            s.push_str(&format!("- {n}\n"));
        }
    }
    s.push_str(&format!("\n{END}\n"));
    s
}

/// Replaces the generated section of `path` (or creates the file with a heading).
pub fn write_docs(path: &Path, section: &str) -> Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if e > b => {
            format!(
                "{}{}{}",
                &old[..b],
                section.trim_end(),
                &old[e + END.len()..]
            )
        }
        _ if old.is_empty() => format!(
            "# orderpush benchmarks\n\nGenerated by the benchmark suite in `bench/` \
             (bench/README.md). Regenerate with the command below; hand-written analysis goes \
             outside the generated block.\n\n{section}"
        ),
        _ => format!("{}\n\n{section}", old.trim_end()),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, new).with_context(|| format!("write {}", path.display()))
}
