//! `msrwasm ctl top`: a running VM's MSR traffic, refreshed in place like
//! `kvm_stat` or `top`, over the control API.
//!
//! Each refresh reads `GET /v1/status` and `GET /v1/footprint` (two small
//! requests; the vCPUs never wait on them beyond copying their own
//! footprint counters) and shows, per MSR and direction, the access rate
//! since the last refresh, the total, the #GPs and who answered; per plugin,
//! its counters, its mean call time (when the VM times calls, as it does
//! with `--api-sock`) and whether it is quarantined; and policy changes as
//! they happen. Keys: `r` sort by rate, `c` by total, `i` by MSR index,
//! `q` (or Esc, Ctrl-C) quits. Without a terminal, or with `--once`, it
//! prints one frame (two samples an interval apart) and exits.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// How the MSR table is sorted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortBy {
    /// Accesses per second since the last refresh, highest first.
    Rate,
    /// Accesses in total, highest first.
    Count,
    /// MSR index, then direction.
    Index,
}

/// One MSR row.
#[derive(Clone, Debug, PartialEq)]
struct Row {
    op: String,
    index: String,
    index_value: u64,
    count: u64,
    rate: f64,
    gp: u64,
    answered_by: String,
}

/// What one refresh read.
struct Sample {
    at: Instant,
    status: Value,
    footprint: Vec<Value>,
}

/// The view's state between refreshes.
pub struct Top {
    socket: std::path::PathBuf,
    sort: SortBy,
    previous: Option<Sample>,
    current: Option<Sample>,
    /// Policy changes seen, newest last: (wall time, text).
    changes: VecDeque<(String, String)>,
}

/// Policy changes kept on screen.
const MAX_CHANGES: usize = 5;

impl Top {
    /// A view of the VM behind `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
            sort: SortBy::Rate,
            previous: None,
            current: None,
            changes: VecDeque::new(),
        }
    }

    fn get(&self, path: &str) -> Result<Value> {
        let (status, text) = msrwasm::tools::request(&self.socket, "GET", path, None)
            .with_context(|| format!("API socket {}", self.socket.display()))?;
        if status != 200 {
            bail!("GET {path}: HTTP {status}: {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("GET {path}: not JSON"))
    }

    /// Reads the VM once more.
    pub fn refresh(&mut self) -> Result<()> {
        let status = self.get("/v1/status")?;
        let footprint = match self.get("/v1/footprint")? {
            Value::Array(entries) => entries,
            _ => Vec::new(),
        };
        let sample = Sample {
            at: Instant::now(),
            status,
            footprint,
        };
        if let Some(before) = self.current.as_ref().map(|c| c.status.clone()) {
            self.note_changes(&before, &sample.status);
        }
        self.previous = self.current.replace(sample);
        Ok(())
    }

    fn note_changes(&mut self, before: &Value, now: &Value) {
        let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
        let reloads = |v: &Value, k: &str| v["reloads"][k].as_u64().unwrap_or(0);
        let time = wall_clock();
        if n(now, "generation") != n(before, "generation") {
            let names: Vec<String> = now["plugins"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    format!(
                        "{}@{}",
                        p["name"].as_str().unwrap_or("?"),
                        p["version"].as_str().unwrap_or("").get(..8).unwrap_or("")
                    )
                })
                .collect();
            self.push_change(
                time.clone(),
                format!("generation {} in force: {}", n(now, "generation"), names.join(", ")),
            );
        }
        let refused = reloads(now, "refused").saturating_sub(reloads(before, "refused"));
        if refused > 0 {
            self.push_change(time, format!("{refused} change(s) refused; the running policy stays"));
        }
    }

    fn push_change(&mut self, time: String, text: String) {
        if self.changes.len() == MAX_CHANGES {
            self.changes.pop_front();
        }
        self.changes.push_back((time, text));
    }

    /// Sorts the MSR table by `sort` from the next frame on.
    pub fn sort_by(&mut self, sort: SortBy) {
        self.sort = sort;
    }

    fn rows(&self) -> Vec<Row> {
        let Some(current) = &self.current else {
            return Vec::new();
        };
        let before: HashMap<(String, String), u64> = self
            .previous
            .iter()
            .flat_map(|p| &p.footprint)
            .map(|e| (key(e), e["count"].as_u64().unwrap_or(0)))
            .collect();
        let seconds = self
            .previous
            .as_ref()
            .map(|p| current.at.duration_since(p.at).as_secs_f64())
            .filter(|s| *s > 0.0);
        let mut rows: Vec<Row> = current
            .footprint
            .iter()
            .map(|e| {
                let count = e["count"].as_u64().unwrap_or(0);
                let (op, index) = key(e);
                let rate = match seconds {
                    Some(s) => {
                        count.saturating_sub(before.get(&(op.clone(), index.clone())).copied().unwrap_or(0)) as f64 / s
                    }
                    None => 0.0,
                };
                let mut by: Vec<(String, u64)> = e["answered_by"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(w, n)| (w.clone(), n.as_u64().unwrap_or(0)))
                    .collect();
                by.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                let answered_by = by
                    .iter()
                    .map(|(w, n)| format!("{w} {:.0}%", 100.0 * *n as f64 / count.max(1) as f64))
                    .collect::<Vec<_>>()
                    .join(", ");
                Row {
                    index_value: msrwasm::tools::parse_number(&index).unwrap_or(u64::MAX),
                    op,
                    index,
                    count,
                    rate,
                    gp: e["gp"].as_u64().unwrap_or(0),
                    answered_by,
                }
            })
            .collect();
        match self.sort {
            SortBy::Rate => rows.sort_by(|a, b| b.rate.total_cmp(&a.rate).then(b.count.cmp(&a.count))),
            SortBy::Count => rows.sort_by_key(|r| std::cmp::Reverse(r.count)),
            SortBy::Index => rows.sort_by(|a, b| (a.index_value, &a.op).cmp(&(b.index_value, &b.op))),
        }
        rows
    }

    /// The frame: at most `height` lines of at most `width` characters.
    pub fn frame(&self, width: usize, height: usize, interval: Duration) -> Vec<String> {
        let Some(current) = &self.current else {
            return vec!["msrwasm top: waiting for the first sample".into()];
        };
        let s = &current.status;
        let mut head = vec![
            format!(
                "msrwasm top  {}  generation {}  vCPUs {}  up {:.1} s  unhandled {}  reloads {} applied, {} refused",
                self.socket.display(),
                s["generation"].as_u64().unwrap_or(0),
                s["vcpus"].as_u64().unwrap_or(0),
                s["uptime_s"].as_f64().unwrap_or(0.0),
                s["unhandled"].as_str().unwrap_or("?"),
                s["reloads"]["applied"].as_u64().unwrap_or(0),
                s["reloads"]["refused"].as_u64().unwrap_or(0),
            ),
            format!(
                "every {:.1} s   sorted by {}   keys: r rate  c total  i index  q quit",
                interval.as_secs_f64(),
                match self.sort {
                    SortBy::Rate => "rate",
                    SortBy::Count => "total",
                    SortBy::Index => "index",
                }
            ),
            String::new(),
        ];
        let mut plugins = vec![
            String::new(),
            format!(
                "{:<16} {:<16} {:>10} {:>8} {:>8} {:>7} {:>5} {:>10}  {}",
                "PLUGIN", "VERSION", "HANDLED", "FAULT", "PASS", "ERRORS", "QUAR", "MEAN CALL", "STATE"
            ),
        ];
        for p in s["plugins"].as_array().into_iter().flatten() {
            let n = |k: &str| p[k].as_u64().unwrap_or(0);
            let timed = n("timed_calls");
            let mean = match timed {
                0 => "-".to_owned(),
                n => format_ns(p["timed_ns"].as_u64().unwrap_or(0) as f64 / n as f64),
            };
            plugins.push(format!(
                "{:<16} {:<16} {:>10} {:>8} {:>8} {:>7} {:>5} {:>10}  {}",
                clip(p["name"].as_str().unwrap_or("?"), 16),
                p["version"].as_str().unwrap_or("").get(..16).unwrap_or(""),
                n("handled"),
                n("fault"),
                n("pass"),
                n("errors"),
                n("quarantines"),
                mean,
                if p["quarantined"].as_bool() == Some(true) {
                    "QUARANTINED"
                } else {
                    "ok"
                }
            ));
        }
        let mut changes = vec![String::new(), "POLICY CHANGES".to_owned()];
        if self.changes.is_empty() {
            changes.push("  none since top started".into());
        }
        changes.extend(self.changes.iter().map(|(t, c)| format!("  {t}  {c}")));
        let table_head = format!(
            "{:<6} {:<12} {:>12} {:>14} {:>8}  {}",
            "OP", "MSR", "RATE/s", "TOTAL", "#GP", "ANSWERED BY"
        );
        let rows = self.rows();
        let room = height
            .saturating_sub(head.len() + 1 + plugins.len() + changes.len())
            .max(1);
        let mut lines = std::mem::take(&mut head);
        lines.push(table_head);
        for row in rows.iter().take(room) {
            lines.push(format!(
                "{:<6} {:<12} {:>12.1} {:>14} {:>8}  {}",
                row.op, row.index, row.rate, row.count, row.gp, row.answered_by
            ));
        }
        if rows.len() > room {
            lines.push(format!("... {} more MSRs", rows.len() - room));
        }
        lines.extend(plugins);
        lines.extend(changes);
        lines.truncate(height.max(1));
        lines.into_iter().map(|l| clip(&l, width).to_owned()).collect()
    }
}

fn key(e: &Value) -> (String, String) {
    (
        e["op"].as_str().unwrap_or("?").to_owned(),
        e["index"].as_str().unwrap_or("?").to_owned(),
    )
}

fn clip(s: &str, width: usize) -> &str {
    match s.char_indices().nth(width) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn format_ns(ns: f64) -> String {
    match ns {
        n if n < 1e3 => format!("{n:.0} ns"),
        n if n < 1e6 => format!("{:.1} us", n / 1e3),
        n => format!("{:.1} ms", n / 1e6),
    }
}

/// Wall-clock time of day, UTC, `HH:MM:SS`.
fn wall_clock() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{:02}:{:02}:{:02}", secs / 3600 % 24, secs / 60 % 60, secs % 60)
}

/// Runs the view until `q`; with `once` (or without a terminal), prints
/// one frame and returns.
pub fn run(socket: &Path, interval: Duration, once: bool) -> Result<()> {
    let mut top = Top::new(socket);
    top.refresh()?;
    let interactive = !once && std::io::IsTerminal::is_terminal(&std::io::stdout());
    if !interactive {
        std::thread::sleep(interval);
        top.refresh()?;
        for line in top.frame(200, 1000, interval) {
            crate::out!("{line}\n");
        }
        return Ok(());
    }
    let _terminal = Terminal::enter()?;
    let mut next = Instant::now() + interval;
    loop {
        draw(&top, interval)?;
        let wait = next.saturating_duration_since(Instant::now());
        if crossterm::event::poll(wait)? {
            use crossterm::event::{Event, KeyCode, KeyEventKind, KeyModifiers};
            if let Event::Key(k) = crossterm::event::read()?
                && k.kind != KeyEventKind::Release
            {
                match k.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => return Ok(()),
                    KeyCode::Char('r') => top.sort_by(SortBy::Rate),
                    KeyCode::Char('c') => top.sort_by(SortBy::Count),
                    KeyCode::Char('i') => top.sort_by(SortBy::Index),
                    _ => {}
                }
            }
            continue;
        }
        top.refresh()?;
        next = Instant::now() + interval;
    }
}

fn draw(top: &Top, interval: Duration) -> Result<()> {
    use crossterm::{cursor, queue, style, terminal};
    let (width, height) = terminal::size().unwrap_or((100, 30));
    let mut out = std::io::stdout().lock();
    queue!(out, cursor::MoveTo(0, 0), terminal::Clear(terminal::ClearType::All))?;
    for (row, line) in top
        .frame(usize::from(width), usize::from(height), interval)
        .iter()
        .enumerate()
    {
        queue!(out, cursor::MoveTo(0, row as u16), style::Print(line))?;
    }
    out.flush()?;
    Ok(())
}

/// Raw mode on the alternate screen, restored when dropped (also on an
/// error or a panic that unwinds).
struct Terminal;

impl Terminal {
    fn enter() -> Result<Self> {
        crossterm::terminal::enable_raw_mode()?;
        let terminal = Terminal;
        crossterm::execute!(
            std::io::stdout(),
            crossterm::terminal::EnterAlternateScreen,
            crossterm::cursor::Hide
        )?;
        Ok(terminal)
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = crossterm::execute!(
            std::io::stdout(),
            crossterm::cursor::Show,
            crossterm::terminal::LeaveAlternateScreen
        );
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: Instant, generation: u64, refused: u64, counts: &[(&str, &str, u64)]) -> Sample {
        Sample {
            at,
            status: serde_json::json!({
                "generation": generation, "vcpus": 2, "uptime_s": 1.5, "unhandled": "gp",
                "reloads": {"applied": generation - 1, "refused": refused},
                "plugins": [{"name": "rapl", "version": "5c1f0a2b3c4d5e6f77", "handled": 9, "fault": 0, "pass": 0,
                             "errors": 0, "quarantines": 1, "quarantined": true, "timed_calls": 4, "timed_ns": 400}],
            }),
            footprint: counts
                .iter()
                .map(|(op, index, n)| {
                    serde_json::json!({"op": op, "index": index, "count": n, "gp": 0,
                                       "answered_by": {"plugin:rapl": n}})
                })
                .collect(),
        }
    }

    #[test]
    fn rates_sorting_plugins_and_changes_in_the_frame() {
        let t0 = Instant::now();
        let mut top = Top::new(Path::new("/tmp/vm.sock"));
        top.current = Some(sample(t0, 1, 0, &[("rdmsr", "0x611", 100), ("rdmsr", "0x35", 10)]));
        let next = sample(
            t0 + Duration::from_secs(2),
            2,
            1,
            &[("rdmsr", "0x611", 110), ("rdmsr", "0x35", 1010), ("wrmsr", "0x610", 1)],
        );
        top.note_changes(&top.current.as_ref().unwrap().status.clone(), &next.status);
        top.previous = top.current.replace(next);
        let frame = top.frame(200, 40, Duration::from_secs(1));
        let text = frame.join("\n");
        let msr_lines: Vec<&String> = frame
            .iter()
            .filter(|l| l.starts_with("rdmsr") || l.starts_with("wrmsr"))
            .collect();
        assert!(
            msr_lines[0].contains("0x35") && msr_lines[0].contains("500.0"),
            "{text}"
        );
        assert!(msr_lines[1].contains("0x611") && msr_lines[1].contains("5.0"), "{text}");
        assert!(text.contains("plugin:rapl 100%"), "{text}");
        assert!(text.contains("QUARANTINED") && text.contains("100 ns"), "{text}");
        assert!(text.contains("generation 2 in force: rapl@5c1f0a2b"), "{text}");
        assert!(text.contains("1 change(s) refused"), "{text}");

        top.sort_by(SortBy::Index);
        let frame = top.frame(200, 40, Duration::from_secs(1));
        let order: Vec<&str> = frame
            .iter()
            .filter(|l| l.starts_with("rdmsr") || l.starts_with("wrmsr"))
            .map(|l| l.split_whitespace().nth(1).unwrap())
            .collect();
        assert_eq!(order, ["0x35", "0x610", "0x611"]);

        // A small terminal gets a clipped frame.
        let small = top.frame(30, 8, Duration::from_secs(1));
        assert!(
            small.len() <= 8 && small.iter().all(|l| l.chars().count() <= 30),
            "{small:#?}"
        );
    }
}
