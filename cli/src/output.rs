//! How commands print: aligned tables for people, one JSON object per line
//! for scripts, and progress as a bar on a terminal or as plain lines.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use comfy_table::presets::NOTHING;
use comfy_table::{ContentArrangement, Table};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

/// A table with these column headers, fitted to the terminal's width (not
/// wrapped at all when stdout is not a terminal).
pub(crate) fn table(headers: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_style(NOTHING)
        .set_header(headers.iter().copied());
    if let Some((_, columns)) = console::Term::stdout().size_checked() {
        table
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_width(columns);
    }
    table
}

/// Prints `value` as one line of JSON.
pub(crate) fn json_line(out: &mut impl Write, value: &Value) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    out.write_all(b"\n")
}

/// A number, or blank where the broker cannot tell.
pub(crate) fn count(n: Option<u64>) -> String {
    n.map(|n| n.to_string()).unwrap_or_default()
}

/// Asks `question` on the terminal; `false` unless the answer is yes.
pub(crate) fn confirm(question: &str) -> std::io::Result<bool> {
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "Yes" | "YES"))
}

/// Whether a person is at the keyboard: stdin and stderr are terminals.
pub(crate) fn interactive() -> bool {
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

/// Progress through `total` items: a bar with count, rate and ETA on a
/// terminal, a plain line every second otherwise.
pub(crate) enum Progress {
    Bar(ProgressBar),
    Lines {
        verb: &'static str,
        total: u64,
        done: u64,
        started: Instant,
        last: Instant,
    },
}

impl Progress {
    pub(crate) fn new(verb: &'static str, total: u64) -> Self {
        if std::io::stdout().is_terminal() {
            let bar = ProgressBar::new(total);
            let style =
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}")
                    .expect("a valid template")
                    .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(verb);
            bar.enable_steady_tick(Duration::from_millis(200));
            Progress::Bar(bar)
        } else {
            let now = Instant::now();
            Progress::Lines {
                verb,
                total,
                done: 0,
                started: now,
                last: now,
            }
        }
    }

    pub(crate) fn inc(&mut self) {
        match self {
            Progress::Bar(bar) => bar.inc(1),
            Progress::Lines {
                verb,
                total,
                done,
                started,
                last,
            } => {
                *done += 1;
                if last.elapsed() >= Duration::from_secs(1) {
                    *last = Instant::now();
                    let rate = *done as f64 / started.elapsed().as_secs_f64();
                    println!("{verb} {done} of {total} ({rate:.0}/s)");
                }
            }
        }
    }

    pub(crate) fn finish(self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}
