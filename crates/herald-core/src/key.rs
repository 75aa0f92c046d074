//! Notification keys and subscription scopes.
//!
//! A [`Key`] names an advise source (a store, a folder, a message, a table). It is opaque bytes,
//! compared byte for byte, as MAPI's `NOTIFKEY` is. Herald also reads a key in *path form*
//! (`mailbox/folder/item`, segments separated by `/`) for one purpose only: a [`Scope::Subtree`]
//! subscription matches a key and every key below it.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};

use bytes::Bytes;

/// The separator between segments of a key in path form.
pub const PATH_SEPARATOR: u8 = b'/';

/// Keys under this prefix are the server's own (presence); producers may not publish there.
pub const RESERVED_PREFIX: &str = "$herald";

/// An opaque, cheaply cloneable notification key.
///
/// Equality and hashing are over the raw bytes; nothing else about a key is interpreted except
/// by [`Scope::Subtree`] matching.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Key(Bytes);

impl Key {
    /// Builds a key from any bytes. An empty key is representable but rejected by the hub.
    pub fn new(bytes: impl Into<Bytes>) -> Self {
        Key(bytes.into())
    }

    /// Builds a key from a `'static` byte string without copying.
    pub const fn from_static(bytes: &'static [u8]) -> Self {
        Key(Bytes::from_static(bytes))
    }

    /// The raw bytes of the key.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The key as a cheaply cloneable byte buffer.
    pub fn to_bytes(&self) -> Bytes {
        self.0.clone()
    }

    /// Whether the key has no bytes (the hub rejects such keys: MAPI's "missing key").
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The key as UTF-8 text, when it is.
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    /// Whether `self` equals `root` or lies below it in path form (`root/...`).
    pub fn is_within(&self, root: &Key) -> bool {
        is_within(self.as_bytes(), root.as_bytes())
    }

    /// The path-form ancestors of this key from the longest to the shortest, the key itself
    /// first: `a/b/c` yields `a/b/c`, `a/b`, `a`. Segments are split on `/` only.
    pub fn ancestors_and_self(&self) -> impl Iterator<Item = &[u8]> {
        ancestors_and_self(self.as_bytes())
    }

    /// The parent in path form (`a/b` for `a/b/c`), or `None` for a one-segment key.
    pub fn parent(&self) -> Option<Key> {
        let pos = self.0.iter().rposition(|&b| b == PATH_SEPARATOR)?;
        Some(Key(self.0.slice(..pos)))
    }

    /// Appends a segment in path form (`a/b` + `c` = `a/b/c`).
    pub fn child(&self, segment: impl AsRef<[u8]>) -> Key {
        let segment = segment.as_ref();
        let mut out = Vec::with_capacity(self.0.len() + 1 + segment.len());
        out.extend_from_slice(&self.0);
        out.push(PATH_SEPARATOR);
        out.extend_from_slice(segment);
        Key(out.into())
    }
}

/// Whether `key` equals `root` or starts with `root` followed by the path separator.
pub(crate) fn is_within(key: &[u8], root: &[u8]) -> bool {
    key.starts_with(root) && (key.len() == root.len() || key[root.len()] == PATH_SEPARATOR)
}

/// `key` itself, then each prefix of it that ends just before a path separator, longest first.
pub(crate) fn ancestors_and_self(key: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut end = Some(key.len());
    std::iter::from_fn(move || {
        let current = end?;
        let prefix = &key[..current];
        end = prefix.iter().rposition(|&b| b == PATH_SEPARATOR);
        Some(prefix)
    })
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Must agree with `<[u8] as Hash>` so that maps keyed by `Key` can be probed with `&[u8]`.
        self.as_bytes().hash(state);
    }
}

impl Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Key {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Self {
        Key(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<String> for Key {
    fn from(s: String) -> Self {
        Key(Bytes::from(s))
    }
}

impl From<&[u8]> for Key {
    fn from(b: &[u8]) -> Self {
        Key(Bytes::copy_from_slice(b))
    }
}

impl From<Vec<u8>> for Key {
    fn from(b: Vec<u8>) -> Self {
        Key(Bytes::from(b))
    }
}

impl From<Bytes> for Key {
    fn from(b: Bytes) -> Self {
        Key(b)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_str() {
            Some(s) => f.write_str(s),
            None => {
                f.write_str("0x")?;
                for b in self.as_bytes() {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({self})")
    }
}

/// What a subscription listens to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Scope {
    /// Exactly one key, compared byte for byte (MAPI's advise on one source).
    Exact(Key),
    /// A key and every key below it in path form: a whole store, or a folder and its contents
    /// (MS-OXCNOTIF's whole-store and folder scopes).
    Subtree(Key),
    /// What is directly in a folder: events whose folder ([`crate::Notification::parent`]:
    /// the parent the event names, else its key's parent in path form), or for moves and
    /// copies whose old folder, is this key. Not the folder's own events, nor its
    /// subfolders' contents (MAPI's "a message arrived in this folder", EWS's folder ids).
    Children(Key),
}

impl Scope {
    /// The key this scope is anchored at.
    pub fn key(&self) -> &Key {
        match self {
            Scope::Exact(k) | Scope::Subtree(k) | Scope::Children(k) => k,
        }
    }

    /// Whether an event on `key` falls in this scope, judged by the key alone (a children
    /// scope then takes the key's parent in path form; [`Scope::selects`] is the whole rule).
    pub fn matches(&self, key: &Key) -> bool {
        match self {
            Scope::Exact(k) => k == key,
            Scope::Subtree(root) => key.is_within(root),
            Scope::Children(folder) => key.parent().is_some_and(|p| &p == folder),
        }
    }

    /// Whether event `n` falls in this scope: by its key or, for a move or copy, its old key
    /// (a children scope: by its folder or old folder).
    pub fn selects(&self, n: &crate::Notification) -> bool {
        match self {
            Scope::Children(folder) => {
                n.parent().is_some_and(|p| &p == folder)
                    || n.old_parent().is_some_and(|p| &p == folder)
            }
            _ => self.matches(&n.key) || n.old_key().is_some_and(|k| self.matches(k)),
        }
    }
}

/// A subscription's selection: a scope and an event mask. The hub indexes subscriptions by
/// scope; this is the same rule for one event, for code that filters events itself (replay
/// from the log, for one).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Filter {
    /// Which keys.
    pub scope: Scope,
    /// Which kinds.
    pub mask: crate::EventMask,
}

impl Filter {
    /// Whether the event is selected: its kind is in the mask and it is in the scope
    /// ([`Scope::selects`]).
    pub fn matches(&self, n: &crate::Notification) -> bool {
        self.mask.contains(n.kind()) && self.scope.selects(n)
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for Key {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.as_bytes())
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Bytes::deserialize(d).map(Key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestors_are_listed_longest_first() {
        let k = Key::from("a/b/c");
        let got: Vec<&[u8]> = k.ancestors_and_self().collect();
        assert_eq!(got, vec![&b"a/b/c"[..], b"a/b", b"a"]);
    }

    #[test]
    fn ancestors_of_one_segment_key_is_itself() {
        let k = Key::from("store");
        assert_eq!(
            k.ancestors_and_self().collect::<Vec<_>>(),
            vec![&b"store"[..]]
        );
    }

    #[test]
    fn ancestors_keep_empty_segments_as_bytes() {
        let k = Key::from("a//b");
        let got: Vec<&[u8]> = k.ancestors_and_self().collect();
        assert_eq!(got, vec![&b"a//b"[..], b"a/", b"a"]);
    }

    #[test]
    fn subtree_matches_only_on_segment_boundaries() {
        let s = Scope::Subtree(Key::from("alice/inbox"));
        assert!(s.matches(&Key::from("alice/inbox")));
        assert!(s.matches(&Key::from("alice/inbox/m1")));
        assert!(!s.matches(&Key::from("alice/inbox2")));
        assert!(!s.matches(&Key::from("alice")));
    }

    #[test]
    fn exact_compares_raw_bytes() {
        let s = Scope::Exact(Key::new(vec![0xff, b'/', 0x00]));
        assert!(s.matches(&Key::new(vec![0xff, b'/', 0x00])));
        assert!(!s.matches(&Key::new(vec![0xff, b'/'])));
    }

    #[test]
    fn parent_and_child_are_inverse() {
        let k = Key::from("a/b");
        assert_eq!(k.child("c").parent(), Some(k));
        assert_eq!(Key::from("a").parent(), None);
    }

    #[test]
    fn display_shows_hex_for_binary_keys() {
        assert_eq!(Key::new(vec![0xff, 0xfe]).to_string(), "0xfffe");
        assert_eq!(Key::from("x/y").to_string(), "x/y");
    }
}
