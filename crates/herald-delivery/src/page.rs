//! Pages: a bounded read of one subscription's events after a watermark, for long-poll
//! transports (the JSON long-poll, EWS GetEvents) that read the log on each request.

use herald_core::{Notification, Watermark};
use herald_log::{EventLog, ReadError};

/// Log events read per step.
const READ_STEP: usize = 512;

/// What to read.
#[derive(Clone, Copy, Debug)]
pub struct PageRequest {
    /// Read after this watermark.
    pub after: Watermark,
    /// Most events to return.
    pub limit: usize,
    /// Most log events to look at (matching or not), so that a sparse filter over a long log
    /// answers promptly; the cursor lets the client continue.
    pub scan_budget: usize,
    /// Nothing after this watermark is returned (the server is offline: only what the
    /// subscription had already seen before may go).
    pub ceiling: Watermark,
}

/// A page of events.
#[derive(Clone, Debug, PartialEq)]
pub struct Page {
    /// The matching events, in order.
    pub events: Vec<Notification>,
    /// Where to continue: past the last event looked at, matching or not.
    pub cursor: Watermark,
    /// The page stopped at its limit or scan budget with log events after the cursor.
    pub more: bool,
}

/// Reads the page `req` asks for, keeping the events `select` keeps.
pub(crate) async fn read_page<L: EventLog>(
    log: &L,
    req: PageRequest,
    select: impl Fn(&Notification) -> bool,
) -> Result<Page, ReadError> {
    let mut page = Page {
        events: Vec::new(),
        cursor: req.after,
        more: false,
    };
    if req.limit == 0 || req.ceiling <= req.after {
        return Ok(page);
    }
    let mut scanned = 0usize;
    let mut stopped_early = false;
    'read: while scanned < req.scan_budget {
        let step = READ_STEP.min(req.scan_budget - scanned);
        let events = log.read(page.cursor, step).await?;
        if events.is_empty() {
            break;
        }
        for n in events {
            let Some(w) = n.watermark else { continue };
            if w > req.ceiling {
                break 'read;
            }
            scanned += 1;
            page.cursor = w;
            if select(&n) {
                page.events.push(n);
                if page.events.len() >= req.limit {
                    stopped_early = true;
                    break 'read;
                }
            }
        }
    }
    if scanned >= req.scan_budget {
        stopped_early = true;
    }
    if stopped_early {
        page.more = log.bounds().is_ok_and(|b| page.cursor < b.last);
    }
    Ok(page)
}
