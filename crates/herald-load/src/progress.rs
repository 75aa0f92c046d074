//! Progress of each phase of a run, on standard error (the results go to standard output
//! unchanged): a bar on a terminal, plain lines every few seconds when asked for
//! (`--progress` or `HERALD_PROGRESS=1`), nothing otherwise.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{HumanCount, HumanDuration, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_util::sync::CancellationToken;

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Off,
    Bar,
    Lines,
}

impl Mode {
    /// A bar when standard error is a terminal, plain lines when `forced`, else nothing.
    pub(crate) fn choose(forced: bool) -> Mode {
        if std::io::stderr().is_terminal() {
            Mode::Bar
        } else if forced {
            Mode::Lines
        } else {
            Mode::Off
        }
    }
}

/// What a phase is measured against.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Plan {
    /// This many events (or connections) are expected.
    Count(u64),
    /// It runs for about this long.
    For(Duration),
}

/// How often the bar is refreshed, and a plain line printed.
const TICK: Duration = Duration::from_millis(200);
const LINE_EVERY: Duration = Duration::from_secs(5);

/// A phase being shown; dropping it clears the bar (before the results are printed) or prints
/// a last line.
pub(crate) struct Phase {
    stop: CancellationToken,
    shown: Option<Shown>,
}

/// What a shown phase needs to draw itself.
struct Shown {
    mode: Mode,
    name: String,
    plan: Plan,
    count: Arc<dyn Fn() -> u64 + Send + Sync>,
    bar: ProgressBar,
    started: Instant,
}

impl Shown {
    /// Brings the bar up to date.
    fn update(&self) -> u64 {
        let n = (self.count)();
        match self.plan {
            Plan::Count(_) => self.bar.set_position(n),
            Plan::For(d) => {
                self.bar
                    .set_position(self.started.elapsed().min(d).as_millis() as u64);
                self.bar.set_message(HumanCount(n).to_string());
            }
        }
        n
    }

    /// One plain line.
    fn line(&self, n: u64, done: bool) {
        let elapsed = HumanDuration(self.started.elapsed());
        let done = if done { "  done" } else { "" };
        match self.plan {
            Plan::Count(total) => eprintln!(
                "{}  {}/{}  {elapsed} elapsed{done}",
                self.name,
                HumanCount(n),
                HumanCount(total)
            ),
            Plan::For(d) => eprintln!(
                "{}  {elapsed} of {}  {} events{done}",
                self.name,
                HumanDuration(d),
                HumanCount(n)
            ),
        }
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(shown) = &self.shown {
            let n = shown.update();
            if shown.mode == Mode::Lines {
                shown.line(n, true);
            }
            shown.bar.finish_and_clear();
        }
    }
}

/// Shows phase `name` against `plan`, counting with `count` (events so far). Must be called
/// inside the runtime: a task refreshes it until the returned [`Phase`] drops.
pub(crate) fn phase(
    mode: Mode,
    name: impl Into<String>,
    plan: Plan,
    count: impl Fn() -> u64 + Send + Sync + 'static,
) -> Phase {
    let stop = CancellationToken::new();
    if mode == Mode::Off {
        return Phase { stop, shown: None };
    }
    let (len, template) = match plan {
        Plan::Count(n) => (
            n,
            "{prefix}  {human_pos}/{human_len}  ({per_sec})  {elapsed} elapsed  {wide_bar}",
        ),
        Plan::For(d) => (
            d.as_millis() as u64,
            "{prefix}  {elapsed} of {planned}  {msg} events  {wide_bar}",
        ),
    };
    let target = if mode == Mode::Bar {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    let planned = match plan {
        Plan::For(d) => HumanDuration(d).to_string(),
        Plan::Count(_) => String::new(),
    };
    bar.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .with_key(
                "planned",
                move |_: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{planned}");
                },
            ),
    );
    let name = name.into();
    bar.set_prefix(name.clone());
    let shown = Shown {
        mode,
        name,
        plan,
        count: Arc::new(count),
        bar,
        started: Instant::now(),
    };
    let ticker = Shown {
        name: shown.name.clone(),
        count: shown.count.clone(),
        bar: shown.bar.clone(),
        ..shown
    };
    let done = stop.clone();
    tokio::spawn(async move {
        let mut last_line = Instant::now();
        loop {
            tokio::select! {
                () = done.cancelled() => break,
                () = tokio::time::sleep(TICK) => {}
            }
            let n = ticker.update();
            if ticker.mode == Mode::Lines && last_line.elapsed() >= LINE_EVERY {
                last_line = Instant::now();
                ticker.line(n, false);
            }
        }
    });
    Phase {
        stop,
        shown: Some(shown),
    }
}
