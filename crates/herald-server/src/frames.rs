//! Wire frames shared by all subscribers of an event: each event is serialized to JSON once
//! (whatever the number of subscribers receiving it), and the transports wrap those bytes.

use std::sync::Mutex;

use bytes::{BufMut, Bytes, BytesMut};
use herald_core::{ConnectionStateChange, Event, Notification, StateChangePhase};

use crate::json::EventOut;

/// Slots in the cache: events older than this many watermarks are serialized again if a
/// straggler asks (correct, just slower).
const SLOTS: usize = 8192;

/// One cache slot: the watermark it holds and that event's JSON.
type Slot = Mutex<Option<(u64, Bytes)>>;

/// The JSON of recent events, by watermark.
pub struct EventCache {
    slots: Box<[Slot]>,
}

impl Default for EventCache {
    fn default() -> Self {
        EventCache {
            slots: (0..SLOTS).map(|_| Mutex::new(None)).collect(),
        }
    }
}

impl EventCache {
    /// The event's JSON (the API's `EventJson` form, written by `EventOut`), serialized at most once per watermark.
    /// A presence change told with a subscriber's own client token is not the stored event:
    /// it is serialized each time, never cached.
    pub fn json(&self, n: &Notification) -> Bytes {
        let Some(w) = n.watermark else {
            return serialize(n);
        };
        if matches!(&n.event, Event::ConnectionState(c) if c.client_token != 0) {
            return serialize(n);
        }
        let slot = &self.slots[(w.0 % SLOTS as u64) as usize];
        if let Some((sw, bytes)) = &*slot.lock().unwrap_or_else(|e| e.into_inner()) {
            if *sw == w.0 {
                return bytes.clone();
            }
        }
        // Serialize outside the lock; two subscribers racing both serialize, which is fine.
        let bytes = serialize(n);
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some((w.0, bytes.clone()));
        bytes
    }

    /// Appends the SSE frame of `n` (`id:` when it has a watermark, `event:`, `data:`) to
    /// `out`.
    pub fn sse_frame(&self, n: &Notification, out: &mut BytesMut) {
        let json = self.json(n);
        out.reserve(json.len() + 48);
        // Without a watermark (the first phases of a told state change) there is no `id:`,
        // so the client's Last-Event-ID stays at the last position it can resume from.
        if let Some(w) = n.watermark {
            out.put_slice(b"id: ");
            out.put_slice(w.0.to_string().as_bytes());
            out.put_slice(b"\n");
        }
        out.put_slice(b"event: ");
        out.put_slice(n.kind().name().as_bytes());
        out.put_slice(b"\ndata: ");
        // Compact JSON holds no newline, so one data line carries it.
        out.put_slice(&json);
        out.put_slice(b"\n\n");
    }

    /// The WebSocket text of an `event` frame for the connection's subscription `id`.
    pub fn ws_event(&self, id: &str, n: &Notification) -> String {
        let json = self.json(n);
        let id = serde_json::to_string(id).unwrap_or_else(|_| "\"\"".into());
        let mut s = String::with_capacity(json.len() + id.len() + 32);
        s.push_str(r#"{"type":"event","id":"#);
        s.push_str(&id);
        s.push_str(r#","event":"#);
        s.push_str(std::str::from_utf8(&json).unwrap_or("null"));
        s.push('}');
        s
    }
}

/// A subscriber's advise on connection state (`MAPIOFFLINE_ADVISEINFO`'s client token), given
/// with its filter: presence changes reach it as the offline-state API's three phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateAdvise {
    /// The client's token, echoed in every phase.
    pub token: u32,
}

/// What one stored event is for one subscriber: itself, or the phases of a state change.
pub enum Told<'a> {
    /// The event as stored.
    Itself(&'a Notification),
    /// A presence change to a subscriber that advised: start, change and done.
    Phases(Box<[Notification; 3]>),
}

impl Told<'_> {
    /// The notifications, in the order they are told.
    pub fn as_slice(&self) -> &[Notification] {
        match self {
            Told::Itself(n) => std::slice::from_ref(*n),
            Told::Phases(p) => &p[..],
        }
    }
}

/// How `n` is told to a subscriber with `advise`: a presence change (stored as one `done`
/// with token 0) becomes `start`, `change` and `done`, each with the subscriber's token and the
/// changed mask and states of the event; only the `done` carries the watermark, so a client
/// that resumes after the last watermark it saw gets a cut sequence again, whole. Any other
/// event, or any event to a subscriber that did not advise, is told as it is.
pub fn told(n: &Notification, advise: Option<StateAdvise>) -> Told<'_> {
    let (Some(advise), Event::ConnectionState(c)) = (advise, &n.event) else {
        return Told::Itself(n);
    };
    let phase = |phase, watermark| {
        let mut m = n.clone();
        m.event = Event::ConnectionState(ConnectionStateChange {
            phase,
            client_token: advise.token,
            ..c.clone()
        });
        m.watermark = watermark;
        m
    };
    Told::Phases(Box::new([
        phase(StateChangePhase::Start, None),
        phase(StateChangePhase::Change, None),
        phase(StateChangePhase::Done, n.watermark),
    ]))
}

fn serialize(n: &Notification) -> Bytes {
    // Sized for a typical event at once: growing from serde_json's default showed in profiles.
    let mut out = Vec::with_capacity(384);
    match serde_json::to_writer(&mut out, &EventOut(n)) {
        Ok(()) => Bytes::from(out),
        Err(_) => Bytes::new(),
    }
}

/// An SSE frame of a named event with a JSON body.
pub fn sse_named(name: &str, body: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {body}\n\n"))
}

/// The SSE comment that keeps idle connections open through proxies.
pub const SSE_KEEPALIVE: &[u8] = b": keep-alive\n\n";

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::{Event, ObjectChange, Watermark};

    fn ev(w: u64) -> Notification {
        let mut n = Notification::new("a/b", Event::ObjectCreated(ObjectChange::default()));
        n.watermark = Some(Watermark(w));
        n
    }

    #[test]
    fn frames_carry_the_shared_json() {
        let cache = EventCache::default();
        let n = ev(7);
        let mut out = BytesMut::new();
        cache.sse_frame(&n, &mut out);
        let text = std::str::from_utf8(&out).unwrap();
        assert!(
            text.starts_with("id: 7\nevent: object_created\ndata: {\"key\":\"a/b\""),
            "{text}"
        );
        assert!(text.ends_with("}\n\n"));
        let ws: serde_json::Value = serde_json::from_str(&cache.ws_event("s\"1", &n)).unwrap();
        assert_eq!(ws["id"], "s\"1");
        assert_eq!(ws["event"]["watermark"], 7);
        // The same bytes are handed out again, and a different event in the same slot
        // replaces them.
        assert_eq!(cache.json(&n), cache.json(&n));
        let other = ev(7 + SLOTS as u64);
        assert!(cache.json(&other) != Bytes::new());
        let again: serde_json::Value = serde_json::from_slice(&cache.json(&n)).unwrap();
        assert_eq!(again["watermark"], 7);
    }

    #[test]
    fn a_told_state_change_has_its_own_json_and_only_its_done_is_a_position() {
        use herald_core::{STATE_OFFLINE, STATE_OFFLINE_MASK, STATE_ONLINE};
        let mut stored = Notification::new(
            "$herald/presence/a/1",
            Event::ConnectionState(ConnectionStateChange {
                phase: StateChangePhase::Done,
                client_token: 0,
                changed_mask: STATE_OFFLINE_MASK,
                old_state: STATE_OFFLINE,
                new_state: STATE_ONLINE,
            }),
        );
        stored.watermark = Some(Watermark(42));
        let cache = EventCache::default();
        let plain = cache.json(&stored);
        assert!(matches!(told(&stored, None), Told::Itself(_)));
        let t = told(&stored, Some(StateAdvise { token: 5 }));
        let mut out = BytesMut::new();
        for m in t.as_slice() {
            cache.sse_frame(m, &mut out);
        }
        let text = std::str::from_utf8(&out).unwrap();
        let frames: Vec<&str> = text.split("\n\n").filter(|f| !f.is_empty()).collect();
        assert_eq!(frames.len(), 3, "{text}");
        for (f, phase) in frames.iter().zip(["start", "change", "done"]) {
            assert_eq!(f.starts_with("id: 42\n"), phase == "done", "{f}");
            assert!(f.contains(&format!("\"phase\":\"{phase}\"")), "{f}");
            assert!(f.contains("\"client_token\":5"), "{f}");
        }
        // The stored event's shared JSON is untouched by what one subscriber was told.
        assert_eq!(cache.json(&stored), plain);
        assert!(
            std::str::from_utf8(&plain)
                .unwrap()
                .contains("\"client_token\":0")
        );
    }
}
