//! Progress of `herald tail` replaying history, on standard error (standard output carries
//! only events): a bar on a terminal, or plain periodic lines when asked for.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{HumanCount, HumanDuration, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressMode {
    /// Not at all (standard error is not a terminal, and nobody asked).
    Off,
    /// A bar redrawn in place.
    Bar,
    /// A line every [`LINE_EVERY`], for logs and tests.
    Lines,
}

impl ProgressMode {
    /// A bar when standard error is a terminal; otherwise plain lines if `forced` (`--progress`
    /// or `HERALD_PROGRESS=1`), else nothing.
    pub fn choose(forced: bool) -> ProgressMode {
        if std::io::stderr().is_terminal() {
            ProgressMode::Bar
        } else if forced {
            ProgressMode::Lines
        } else {
            ProgressMode::Off
        }
    }
}

/// How often a plain progress line is printed.
pub const LINE_EVERY: Duration = Duration::from_secs(1);

/// The replay of a tail from `after` up to the log's head when it started.
#[derive(Debug)]
pub struct Replay {
    mode: ProgressMode,
    bar: ProgressBar,
    after: u64,
    head: u64,
    last_line: Instant,
    caught_up: bool,
}

impl Replay {
    /// Starts showing the replay of `(after, head]`; says at once that it is caught up when
    /// there is nothing to replay.
    pub fn start(mode: ProgressMode, after: u64, head: u64) -> Replay {
        let len = head.saturating_sub(after);
        let target = match mode {
            ProgressMode::Bar => ProgressDrawTarget::stderr(),
            ProgressMode::Off | ProgressMode::Lines => ProgressDrawTarget::hidden(),
        };
        let bar = ProgressBar::with_draw_target(Some(len), target);
        bar.set_style(
            ProgressStyle::with_template(
                "replaying  {human_pos}/{human_len} events  ({rate}, eta {eta})  {wide_bar}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .with_key(
                "rate",
                |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.0} ev/s", s.per_sec());
                },
            ),
        );
        let mut replay = Replay {
            mode,
            bar,
            after,
            head,
            last_line: Instant::now(),
            caught_up: false,
        };
        if len == 0 {
            replay.finish();
        } else {
            replay.line();
        }
        replay
    }

    /// Whether the replay is over (live events from here on).
    pub fn caught_up(&self) -> bool {
        self.caught_up
    }

    /// An event at `watermark` was printed.
    pub fn seen(&mut self, watermark: u64) {
        if self.caught_up {
            return;
        }
        self.bar
            .set_position(watermark.min(self.head).saturating_sub(self.after));
        if watermark >= self.head {
            self.finish();
        } else if self.last_line.elapsed() >= LINE_EVERY {
            self.line();
        }
    }

    /// Nothing arrived for a while below the head: the events left up to it do not match the
    /// filter (the server does not say where its replay is, only what matches).
    pub fn quiet(&mut self) {
        if !self.caught_up {
            self.bar.set_position(self.head.saturating_sub(self.after));
            self.finish();
        }
    }

    fn line(&mut self) {
        self.last_line = Instant::now();
        if self.mode == ProgressMode::Lines {
            eprintln!(
                "replaying  {}/{} events  ({:.0} ev/s, eta {})",
                HumanCount(self.bar.position()),
                HumanCount(self.bar.length().unwrap_or(0)),
                self.bar.per_sec(),
                HumanDuration(self.bar.eta())
            );
        }
    }

    fn finish(&mut self) {
        self.caught_up = true;
        if self.mode == ProgressMode::Off {
            return;
        }
        self.line();
        self.bar.finish_and_clear();
        eprintln!("caught up at watermark {}", self.head);
    }
}
