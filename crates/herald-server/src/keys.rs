//! API keys and token revocations kept in the data directory, changed by the CLI while the
//! server runs and picked up within a second.
//!
//! `api-keys`: one key per line, its SHA-256 in hex, then its attributes form-encoded:
//! `created`, `name`, `prefix` (repeatable: the key prefixes it may publish to and read;
//! none: all), `ops` (`publish`, `admin`, comma-separated; absent: both), `revoked` (when).
//! `revoked-tokens`: one revocation per line, form-encoded: `jti=<id>` (one token) or
//! `sub=<subject>&before=<unix seconds>` (every token of a subject issued before then).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

/// The file, in the data directory, holding hashes of keys made with `herald keys create`.
pub const KEYS_FILE: &str = "api-keys";
/// The file, in the data directory, listing revoked tokens.
pub const REVOKED_TOKENS_FILE: &str = "revoked-tokens";

/// Which API key: the first 8 bytes of its SHA-256, in hex. Stable across restarts; says
/// nothing about the key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyId(pub String);

impl KeyId {
    /// The id of the key whose SHA-256 is `hash`.
    pub fn of(hash: &[u8; 32]) -> KeyId {
        KeyId(hex(&hash[..8]))
    }
}

/// What an API key may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyGrant {
    /// Which key.
    pub id: KeyId,
    /// Its name, if it was given one.
    pub name: Option<String>,
    /// The key prefixes it may publish to and read (`None`: all).
    pub prefixes: Option<Vec<String>>,
    /// Whether it may publish.
    pub publish: bool,
    /// Whether it may operate the server (state, connections, every subscription).
    pub admin: bool,
}

impl KeyGrant {
    /// A key that may do everything (a configured `auth.keys` entry).
    pub fn full(hash: &[u8; 32]) -> KeyGrant {
        KeyGrant {
            id: KeyId::of(hash),
            name: None,
            prefixes: None,
            publish: true,
            admin: true,
        }
    }
}

/// One line of the key file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyEntry {
    /// The key's SHA-256.
    pub hash: [u8; 32],
    /// When it was made, seconds since the Unix epoch.
    pub created: u64,
    /// What it may do.
    pub grant: KeyGrant,
    /// When it was revoked, if it was.
    pub revoked: Option<u64>,
}

impl KeyEntry {
    /// Reads a line; `None` if it is not one.
    pub fn parse(line: &str) -> Option<KeyEntry> {
        let (hex_hash, attrs) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
        let hash = unhex(hex_hash)?;
        let mut entry = KeyEntry {
            hash,
            created: 0,
            grant: KeyGrant::full(&hash),
            revoked: None,
        };
        let mut prefixes = Vec::new();
        for (k, v) in url::form_urlencoded::parse(attrs.trim().as_bytes()) {
            match k.as_ref() {
                "created" => entry.created = v.parse().unwrap_or(0),
                "name" => entry.grant.name = Some(v.into_owned()),
                "prefix" => prefixes.push(v.into_owned()),
                "ops" => {
                    let ops: Vec<&str> = v.split(',').map(str::trim).collect();
                    entry.grant.publish = ops.contains(&"publish");
                    entry.grant.admin = ops.contains(&"admin");
                }
                "revoked" => entry.revoked = v.parse().ok(),
                _ => {}
            }
        }
        if !prefixes.is_empty() {
            entry.grant.prefixes = Some(prefixes);
        }
        Some(entry)
    }

    /// The line for this entry.
    pub fn line(&self) -> String {
        let mut attrs = url::form_urlencoded::Serializer::new(String::new());
        attrs.append_pair("created", &self.created.to_string());
        if let Some(n) = &self.grant.name {
            attrs.append_pair("name", n);
        }
        for p in self.grant.prefixes.iter().flatten() {
            attrs.append_pair("prefix", p);
        }
        let ops: Vec<&str> = [("publish", self.grant.publish), ("admin", self.grant.admin)]
            .into_iter()
            .filter_map(|(o, on)| on.then_some(o))
            .collect();
        attrs.append_pair("ops", &ops.join(","));
        if let Some(r) = self.revoked {
            attrs.append_pair("revoked", &r.to_string());
        }
        format!("{} {}\n", hex(&self.hash), attrs.finish())
    }
}

/// A token revocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Revocation {
    /// The token with this id.
    Token(String),
    /// Every token of `sub` issued before `before` (seconds since the Unix epoch).
    Subject {
        /// The subject.
        sub: String,
        /// Tokens issued before this are revoked.
        before: u64,
    },
}

impl Revocation {
    /// Reads a line; `None` if it is not one.
    pub fn parse(line: &str) -> Option<Revocation> {
        let mut jti = None;
        let mut sub = None;
        let mut before = None;
        for (k, v) in url::form_urlencoded::parse(line.trim().as_bytes()) {
            match k.as_ref() {
                "jti" => jti = Some(v.into_owned()),
                "sub" => sub = Some(v.into_owned()),
                "before" => before = v.parse().ok(),
                _ => {}
            }
        }
        match (jti, sub, before) {
            (Some(j), _, _) => Some(Revocation::Token(j)),
            (None, Some(sub), Some(before)) => Some(Revocation::Subject { sub, before }),
            _ => None,
        }
    }

    /// The line for this revocation.
    pub fn line(&self) -> String {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        match self {
            Revocation::Token(j) => s.append_pair("jti", j),
            Revocation::Subject { sub, before } => s
                .append_pair("sub", sub)
                .append_pair("before", &before.to_string()),
        };
        format!("{}\n", s.finish())
    }

    /// Whether it revokes a token of `sub`, with id `jti`, issued at `iat` (a token without
    /// `iat` counts as issued at 0: revoked by any revocation of its subject).
    pub fn covers(&self, sub: &str, jti: Option<&str>, iat: Option<u64>) -> bool {
        match self {
            Revocation::Token(j) => jti == Some(j.as_str()),
            Revocation::Subject { sub: s, before } => s == sub && iat.unwrap_or(0) < *before,
        }
    }
}

/// What the two files say, reread when they change.
#[derive(Debug, Default)]
struct Loaded {
    keys: Vec<KeyEntry>,
    revocations: Vec<Revocation>,
    stamps: (Option<SystemTime>, Option<SystemTime>),
}

/// The key file and the revocation file of a data directory.
#[derive(Debug)]
pub struct Store {
    keys_path: PathBuf,
    revoked_path: PathBuf,
    loaded: Mutex<(Loaded, Instant)>,
    /// Bumped whenever a reread changed something (streams re-check their credentials).
    changed: tokio::sync::watch::Sender<u64>,
}

impl Store {
    /// The files of `data_dir`, read now.
    pub fn new(data_dir: &Path) -> Store {
        let store = Store {
            keys_path: data_dir.join(KEYS_FILE),
            revoked_path: data_dir.join(REVOKED_TOKENS_FILE),
            loaded: Mutex::new((Loaded::default(), Instant::now() - Duration::from_secs(10))),
            changed: tokio::sync::watch::Sender::new(0),
        };
        store.reload(true);
        store
    }

    /// Whether a key file exists (then the API needs credentials).
    pub fn has_key_file(&self) -> bool {
        self.keys_path.exists()
    }

    /// Rereads the files if they changed (at most once a second unless `now`).
    pub fn reload(&self, now: bool) {
        let mut guard = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if !now && guard.1.elapsed() < Duration::from_secs(1) {
            return;
        }
        guard.1 = Instant::now();
        let stamp = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let stamps = (stamp(&self.keys_path), stamp(&self.revoked_path));
        if stamps == guard.0.stamps && !now {
            return;
        }
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        guard.0 = Loaded {
            keys: read(&self.keys_path)
                .lines()
                .filter_map(KeyEntry::parse)
                .collect(),
            revocations: read(&self.revoked_path)
                .lines()
                .filter_map(Revocation::parse)
                .collect(),
            stamps,
        };
        drop(guard);
        self.changed.send_modify(|n| *n += 1);
    }

    /// What the key whose SHA-256 is `hash` may do, if it is a live key of the file.
    pub fn grant(&self, hash: &[u8; 32]) -> Option<KeyGrant> {
        self.reload(false);
        let guard = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .0
            .keys
            .iter()
            .find(|k| k.revoked.is_none() && constant_time_eq(&k.hash, hash))
            .map(|k| k.grant.clone())
    }

    /// Whether key `id` of the file is revoked.
    pub fn key_revoked(&self, id: &KeyId) -> bool {
        let guard = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .0
            .keys
            .iter()
            .any(|k| &k.grant.id == id && k.revoked.is_some())
    }

    /// Whether a token of `sub`, with `jti`, issued at `iat`, is revoked.
    pub fn token_revoked(&self, sub: &str, jti: Option<&str>, iat: Option<u64>) -> bool {
        self.reload(false);
        let guard = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        guard.0.revocations.iter().any(|r| r.covers(sub, jti, iat))
    }

    /// Follows changes of the files.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// The keys of a data directory's key file, for the CLI.
pub fn list(data_dir: &Path) -> std::io::Result<Vec<KeyEntry>> {
    let text = match std::fs::read_to_string(data_dir.join(KEYS_FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    Ok(text.lines().filter_map(KeyEntry::parse).collect())
}

/// Rewrites the key file with `entries`, atomically (a reader sees the old or the new).
pub fn write(data_dir: &Path, entries: &[KeyEntry]) -> std::io::Result<()> {
    let path = data_dir.join(KEYS_FILE);
    let tmp = data_dir.join(format!("{KEYS_FILE}.new"));
    let text: String = entries.iter().map(KeyEntry::line).collect();
    std::fs::write(&tmp, text)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)
}

/// Makes a new API key (`hk_` and 32 random bytes), stores its hash and what it may do in
/// the data directory's key file, and returns it (it is stored nowhere else).
pub fn create(
    data_dir: &Path,
    name: Option<&str>,
    prefixes: &[String],
    publish: bool,
    admin: bool,
) -> std::io::Result<String> {
    use base64::Engine;
    use rand::Rng;
    herald_log::create_data_dir(data_dir)?;
    let bytes: [u8; 32] = rand::rng().random();
    let key = format!(
        "hk_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let h = hash(&key);
    let mut entries = list(data_dir)?;
    entries.push(KeyEntry {
        hash: h,
        created: unix_now(),
        grant: KeyGrant {
            id: KeyId::of(&h),
            name: name.map(str::to_owned),
            prefixes: (!prefixes.is_empty()).then(|| prefixes.to_vec()),
            publish,
            admin,
        },
        revoked: None,
    });
    write(data_dir, &entries)?;
    Ok(key)
}

/// Revokes the keys whose id or name is `which`; returns how many. A running server stops
/// accepting them within a second, and closes their streams.
pub fn revoke(data_dir: &Path, which: &str) -> std::io::Result<usize> {
    let mut entries = list(data_dir)?;
    let now = unix_now();
    let mut n = 0;
    for e in &mut entries {
        let named = e.grant.id.0 == which || e.grant.name.as_deref() == Some(which);
        if named && e.revoked.is_none() {
            e.revoked = Some(now);
            n += 1;
        }
    }
    if n > 0 {
        write(data_dir, &entries)?;
    }
    Ok(n)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Appends a revocation to the data directory's revocation file.
pub fn revoke_tokens(data_dir: &Path, r: &Revocation) -> std::io::Result<()> {
    use std::io::Write;
    herald_log::create_data_dir(data_dir)?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data_dir.join(REVOKED_TOKENS_FILE))?;
    f.write_all(r.line().as_bytes())?;
    f.sync_all()
}

/// SHA-256 of a key.
pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Compares secrets without leaking where they differ through timing.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_lines_round_trip_and_old_lines_are_full_keys() {
        let h = hash("hk_x");
        let old = format!("{} created=17\n", hex(&h));
        let e = KeyEntry::parse(&old).unwrap();
        assert_eq!(e.created, 17);
        assert!(e.grant.publish && e.grant.admin && e.grant.prefixes.is_none());
        let scoped = KeyEntry {
            hash: h,
            created: 5,
            grant: KeyGrant {
                id: KeyId::of(&h),
                name: Some("shop feed".into()),
                prefixes: Some(vec!["shop/a b".into(), "x,y".into()]),
                publish: true,
                admin: false,
            },
            revoked: Some(9),
        };
        assert_eq!(KeyEntry::parse(&scoped.line()).unwrap(), scoped);
        assert!(KeyEntry::parse("not a key").is_none());
    }

    #[test]
    fn revocations_cover_one_token_or_a_subjects_older_tokens() {
        let one = Revocation::parse(&Revocation::Token("t-1".into()).line()).unwrap();
        assert!(one.covers("alice", Some("t-1"), Some(5)));
        assert!(!one.covers("alice", Some("t-2"), Some(5)));
        let all = Revocation::Subject {
            sub: "alice".into(),
            before: 100,
        };
        let all = Revocation::parse(&all.line()).unwrap();
        assert!(all.covers("alice", None, Some(99)));
        assert!(all.covers("alice", None, None), "no iat: issued at 0");
        assert!(!all.covers("alice", None, Some(100)), "issued after");
        assert!(!all.covers("bob", None, Some(1)));
    }
}
