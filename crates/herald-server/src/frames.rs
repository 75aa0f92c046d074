//! Wire frames shared by all subscribers of an event: each event is serialized to JSON once
//! (whatever the number of subscribers receiving it), and the transports wrap those bytes.

use std::sync::Mutex;

use bytes::{BufMut, Bytes, BytesMut};
use herald_core::Notification;

use crate::json::EventJson;

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
    /// The event's JSON (as the API's `EventJson`), serialized at most once per watermark.
    pub fn json(&self, n: &Notification) -> Bytes {
        let Some(w) = n.watermark else {
            return serialize(n);
        };
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

    /// Appends the SSE frame of `n` (`id:`, `event:`, `data:`) to `out`.
    pub fn sse_frame(&self, n: &Notification, out: &mut BytesMut) {
        let json = self.json(n);
        out.reserve(json.len() + 48);
        out.put_slice(b"id: ");
        out.put_slice(n.watermark.map_or(0, |w| w.0).to_string().as_bytes());
        out.put_slice(b"\nevent: ");
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

fn serialize(n: &Notification) -> Bytes {
    serde_json::to_vec(&EventJson::from_notification(n))
        .map(Bytes::from)
        .unwrap_or_default()
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
}
