//! Who may do what.
//!
//! - **API keys** (configured in `auth.keys`, or created with `herald keys create`, which
//!   stores a SHA-256 of the key in `<data_dir>/api-keys`) may publish, subscribe and
//!   administer; a created key may be limited to key prefixes and to operations (publish,
//!   admin), listed, and revoked while the server runs (see `keys`).
//! - **Subscriber tokens** (JWT, HS256 with `auth.token_secret` or EdDSA with
//!   `auth.token_public_key`; `herald token create` mints them) may only read: the key
//!   prefixes and kinds they name, until they expire, within their connection and
//!   subscription limits, unless revoked (`herald token revoke`: one token, or every token
//!   of a subject issued before a time; open streams of a revoked credential close).
//!
//! Credentials come in `Authorization: Bearer`, the `access_token` query parameter, or the
//! `herald_token` cookie (a browser's EventSource can send neither a header nor a body).

use std::collections::HashMap;
use std::path::Path;

use axum::http::{HeaderMap, StatusCode, header};
use herald_core::{EventKind, EventMask, Filter, Key, Scope};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;
use crate::error::ApiError;
pub use crate::keys::{KEYS_FILE, KeyGrant, KeyId};
use crate::keys::{constant_time_eq, hash};

/// What a subscriber token says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The subscriber (the owner of what it creates).
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Key prefixes (path form) it may read; `""` reads everything.
    #[serde(default)]
    pub prefixes: Vec<String>,
    /// Comma-separated kinds it may read (absent: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<String>,
    /// Most durable subscriptions it may hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_subscriptions: Option<u32>,
    /// Most streaming connections (SSE, WebSocket) it may hold at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Its id, for revoking it alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// When it was issued, seconds since the Unix epoch (revoking a subject's tokens revokes
    /// those issued before a time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// Who is asking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// Authentication is off.
    Open,
    /// An API key, and what it may do.
    Key(KeyGrant),
    /// A subscriber token.
    Token(Claims),
}

impl Principal {
    /// What an idempotency key is scoped to: one producer's keys are not another's.
    pub fn idempotency_scope(&self) -> String {
        match self {
            Principal::Open => "open".to_owned(),
            Principal::Key(g) => format!("key:{}", g.id.0),
            Principal::Token(c) => format!("token:{}", c.sub),
        }
    }

    /// The owner recorded on what this principal creates.
    pub fn owner(&self) -> Option<String> {
        match self {
            Principal::Token(c) => Some(c.sub.clone()),
            Principal::Open | Principal::Key(_) => None,
        }
    }

    /// Whether this principal may act on something owned by `owner`.
    pub fn may_manage(&self, owner: Option<&str>) -> bool {
        match self {
            Principal::Open | Principal::Key(_) => true,
            Principal::Token(c) => owner == Some(c.sub.as_str()),
        }
    }
}

fn unauthorized(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, code, message)
}

/// A 403.
pub fn forbidden(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, code, message)
}

/// The server's authenticator.
#[derive(Debug)]
pub struct Auth {
    enabled: bool,
    keys: Vec<[u8; 32]>,
    /// Keys made with the CLI, and token revocations.
    store: crate::keys::Store,
    decoding: Option<(DecodingKey, Validation)>,
    /// Streams each token subject holds.
    connections: herald_delivery::Quota,
    /// Exchange users (Basic authentication): lower-cased address → argon2 password hash.
    users: HashMap<String, String>,
    /// Credentials verified lately: (user, SHA-256 of the password) → when. Exchange clients
    /// send Basic credentials with every request; an argon2 check each time would cost tens
    /// of milliseconds of CPU per request.
    verified: std::sync::Mutex<HashMap<(String, [u8; 32]), std::time::Instant>>,
}

/// How long a verified password is remembered.
const VERIFIED_FOR: std::time::Duration = std::time::Duration::from_secs(300);
/// Most verified credentials remembered.
const VERIFIED_CAP: usize = 10_000;

/// An argon2id hash of `password`, in PHC form, for `auth.users`.
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))
}

impl Auth {
    /// The authenticator for this configuration and data directory.
    pub fn new(config: &AuthConfig, data_dir: &Path) -> anyhow::Result<Auth> {
        let decoding = match (&config.token_secret, &config.token_public_key) {
            (Some(_), Some(_)) => {
                anyhow::bail!("configure auth.token_secret or auth.token_public_key, not both")
            }
            (Some(secret), None) => {
                anyhow::ensure!(
                    secret.len() >= 32,
                    "auth.token_secret must be at least 32 bytes"
                );
                let mut v = Validation::new(Algorithm::HS256);
                v.set_required_spec_claims(&["exp", "sub"]);
                v.validate_nbf = true;
                v.leeway = 5;
                Some((DecodingKey::from_secret(secret.as_bytes()), v))
            }
            (None, Some(pem)) => {
                let mut v = Validation::new(Algorithm::EdDSA);
                v.set_required_spec_claims(&["exp", "sub"]);
                v.validate_nbf = true;
                v.leeway = 5;
                Some((DecodingKey::from_ed_pem(pem.as_bytes())?, v))
            }
            (None, None) => None,
        };
        for (user, stored) in &config.users {
            anyhow::ensure!(
                argon2::PasswordHash::new(stored)
                    .is_ok_and(|h| h.algorithm.as_str().starts_with("argon2")),
                "auth.users.\"{user}\" is not a password hash: passwords are stored hashed. Make \
                 the line with `herald users add {user}` (it reads the password from standard \
                 input) and put it in place of this one"
            );
        }
        let store = crate::keys::Store::new(data_dir);
        let auth = Auth {
            enabled: config.enabled() || store.has_key_file(),
            keys: config.keys.iter().map(|k| hash(k)).collect(),
            store,
            decoding,
            connections: herald_delivery::Quota::default(),
            users: config
                .users
                .iter()
                .map(|(u, p)| (u.to_ascii_lowercase(), p.clone()))
                .collect(),
            verified: std::sync::Mutex::default(),
        };
        Ok(auth)
    }

    /// Whether requests are authenticated at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The user a request's Basic credentials name (EWS and MAPI/HTTP), lower-cased;
    /// `Ok(None)` when authentication is off.
    pub fn basic_user(&self, headers: &HeaderMap) -> Result<Option<String>, BasicChallenge> {
        if !self.enabled {
            return Ok(None);
        }
        let basic = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| auth_param(v, "Basic"))
            .ok_or(BasicChallenge)?;
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(basic.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or(BasicChallenge)?;
        let (user, password) = decoded.split_once(':').ok_or(BasicChallenge)?;
        let user = user.to_ascii_lowercase();
        let stored = self.users.get(&user).ok_or(BasicChallenge)?;
        let seen = (user.clone(), hash(password));
        {
            let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            if verified
                .get(&seen)
                .is_some_and(|at| at.elapsed() < VERIFIED_FOR)
            {
                return Ok(Some(user));
            }
        }
        let ok = argon2::PasswordHash::new(stored).is_ok_and(|h| {
            use argon2::PasswordVerifier;
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        });
        if !ok {
            return Err(BasicChallenge);
        }
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= VERIFIED_CAP {
            verified.retain(|_, at| at.elapsed() < VERIFIED_FOR);
            if verified.len() >= VERIFIED_CAP {
                verified.clear();
            }
        }
        verified.insert(seen, std::time::Instant::now());
        Ok(Some(user))
    }

    /// What `candidate` may do if it is an API key.
    fn key_grant(&self, candidate: &str) -> Option<KeyGrant> {
        let h = hash(candidate);
        if self.keys.iter().any(|k| constant_time_eq(k, &h)) {
            return Some(KeyGrant::full(&h));
        }
        self.store.grant(&h)
    }

    /// Rereads the key and revocation files if they changed (the server calls it every
    /// second or so, so that revocations reach open streams).
    pub fn reload(&self) {
        self.store.reload(false);
    }

    /// Whether the principal's credential has been revoked since it was checked.
    pub fn is_revoked(&self, p: &Principal) -> bool {
        match p {
            Principal::Open => false,
            Principal::Key(g) => self.store.key_revoked(&g.id),
            Principal::Token(c) => self.store.token_revoked(&c.sub, c.jti.as_deref(), c.iat),
        }
    }

    /// Resolves when the principal's credential is revoked (never for open access): a
    /// stream it opened closes then.
    pub async fn revoked(&self, p: &Principal) {
        if matches!(p, Principal::Open) {
            return std::future::pending().await;
        }
        let mut changes = self.store.changes();
        loop {
            if self.is_revoked(p) {
                return;
            }
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Who sent these credentials.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Principal, ApiError> {
        if !self.enabled {
            return Ok(Principal::Open);
        }
        let credential = credential(headers, query).ok_or_else(|| {
            unauthorized(
                "unauthorized",
                "credentials are required: Authorization: Bearer <API key or token> (or ?access_token=, or the herald_token cookie)",
            )
        })?;
        if let Some(grant) = self.key_grant(&credential) {
            return Ok(Principal::Key(grant));
        }
        let Some((key, validation)) = &self.decoding else {
            return Err(unauthorized(
                "invalid_credentials",
                "the API key is not valid",
            ));
        };
        match jsonwebtoken::decode::<Claims>(&credential, key, validation) {
            Ok(data) if is_reserved_subject(&data.claims.sub) => Err(unauthorized(
                "invalid_credentials",
                format!(
                    "the token's subject {:?} is reserved (it names unauthenticated and API-key connections)",
                    data.claims.sub
                ),
            )),
            Ok(data)
                if self.store.token_revoked(
                    &data.claims.sub,
                    data.claims.jti.as_deref(),
                    data.claims.iat,
                ) =>
            {
                Err(unauthorized("token_revoked", "the token has been revoked"))
            }
            Ok(data) => Ok(Principal::Token(data.claims)),
            Err(e) => match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => Err(unauthorized(
                    "token_expired",
                    "the token has expired; get a new one",
                )),
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => Err(unauthorized(
                    "token_not_yet_valid",
                    "the token is not valid yet (its nbf is in the future)",
                )),
                _ => Err(unauthorized(
                    "invalid_credentials",
                    format!("neither a valid API key nor a valid token: {e}"),
                )),
            },
        }
    }

    /// A 403 unless the principal may read everything `filter` selects.
    pub fn check_filter(&self, p: &Principal, filter: &Filter) -> Result<(), ApiError> {
        let c = match p {
            Principal::Open => return Ok(()),
            Principal::Key(g) => {
                let Some(prefixes) = &g.prefixes else {
                    return Ok(());
                };
                let key = filter.scope.key();
                if within_prefixes(key, prefixes) {
                    return Ok(());
                }
                let what = match &filter.scope {
                    Scope::Exact(_) => "key",
                    Scope::Subtree(_) => "subtree",
                    Scope::Children(_) => "children",
                };
                return Err(forbidden(
                    "forbidden_scope",
                    format!(
                        "the API key may not read {what} {key}: it allows {}",
                        describe_prefixes(prefixes)
                    ),
                )
                .with_field(what));
            }
            Principal::Token(c) => c,
        };
        let key = filter.scope.key();
        // A subscriber may always watch the presence of its own connections.
        let own_presence = Key::from(herald_delivery::presence::owner_presence(&c.sub).as_str());
        let within = key.is_within(&own_presence)
            || c.prefixes
                .iter()
                .any(|prefix| prefix.is_empty() || key.is_within(&Key::from(prefix.as_str())));
        if !within {
            let what = match &filter.scope {
                Scope::Exact(_) => "key",
                Scope::Subtree(_) => "subtree",
                Scope::Children(_) => "children",
            };
            return Err(forbidden(
                "forbidden_scope",
                format!(
                    "the token may not read {what} {key}: it allows {}",
                    describe_prefixes(&c.prefixes)
                ),
            )
            .with_field(what));
        }
        if let Some(kinds) = &c.kinds {
            let allowed: EventMask = kinds
                .split(',')
                .filter_map(|k| EventKind::from_name(k.trim()))
                .collect();
            if let Some(extra) = EventKind::ALL
                .into_iter()
                .find(|k| filter.mask.contains(*k) && !allowed.contains(*k))
            {
                return Err(forbidden(
                    "forbidden_kind",
                    format!(
                        "the token may not read {} events; ask for kinds={kinds}",
                        extra.name()
                    ),
                )
                .with_field("kinds"));
            }
        }
        Ok(())
    }

    /// A 403 unless the principal may publish.
    pub fn require_producer(&self, p: &Principal) -> Result<(), ApiError> {
        match p {
            Principal::Open => Ok(()),
            Principal::Key(g) if g.publish => Ok(()),
            Principal::Key(_) => Err(forbidden(
                "forbidden",
                "this API key may not publish (its ops do not include publish)",
            )),
            Principal::Token(_) => Err(forbidden(
                "forbidden",
                "subscriber tokens can only read; publishing needs an API key",
            )),
        }
    }

    /// A 403 naming the event unless the principal may publish to every key of `batch`
    /// (an API key limited to prefixes; moves and copies count their old key too).
    pub fn check_publish(
        &self,
        p: &Principal,
        batch: &[herald_core::Notification],
    ) -> Result<(), ApiError> {
        let Principal::Key(KeyGrant {
            prefixes: Some(prefixes),
            ..
        }) = p
        else {
            return Ok(());
        };
        let prefixes: &[String] = prefixes;
        for (i, n) in batch.iter().enumerate() {
            // A named parent routes the event to the folder's children subscribers: it is
            // published to as much as the key.
            let (parent, old_parent) = named_parents(n);
            for (field, key) in [
                ("key", Some(&n.key)),
                ("old_key", n.old_key()),
                ("parent", parent),
                ("old_parent", old_parent),
            ] {
                let Some(key) = key else { continue };
                if !within_prefixes(key, prefixes) {
                    return Err(forbidden(
                        "forbidden_scope",
                        format!(
                            "the API key may not publish to {key}: it allows {}",
                            describe_prefixes(prefixes)
                        ),
                    )
                    .with_field(format!("events[{i}].{field}")));
                }
            }
        }
        Ok(())
    }

    /// A 403 unless the principal is an API key that may administer (or auth is off).
    pub fn require_admin(&self, p: &Principal) -> Result<(), ApiError> {
        match p {
            Principal::Open => Ok(()),
            Principal::Key(g) if g.admin => Ok(()),
            Principal::Key(_) => Err(forbidden(
                "forbidden",
                "this API key may not administer (its ops do not include admin)",
            )),
            Principal::Token(_) => Err(forbidden("forbidden", "this needs an API key")),
        }
    }

    /// Holds one of the principal's streaming connections, or a 429 when it has all it may.
    pub fn connect(&self, p: &Principal) -> Result<ConnectionPermit, ApiError> {
        let Principal::Token(c) = p else {
            return Ok(ConnectionPermit(None));
        };
        match self.connections.acquire(&c.sub, c.max_connections) {
            Some(permit) => Ok(ConnectionPermit(Some(permit))),
            None => Err(too_many(format!(
                "the token already holds its {} connections",
                c.max_connections.unwrap_or_default()
            ))),
        }
    }
}

/// A 429 with `Retry-After`.
pub fn too_many(message: String) -> ApiError {
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "limit_reached", message).with_retry_after(5)
}

/// Whether `key` is within one of `prefixes` (`""` is everything).
/// The parent and old parent an event names explicitly (not those read from its keys).
fn named_parents(n: &herald_core::Notification) -> (Option<&Key>, Option<&Key>) {
    use herald_core::Event;
    match &n.event {
        Event::NewMail(m) => (Some(&m.parent), None),
        Event::ObjectCreated(o)
        | Event::ObjectDeleted(o)
        | Event::ObjectModified(o)
        | Event::SearchComplete(o) => (o.parent.as_ref(), None),
        Event::ObjectMoved(r) | Event::ObjectCopied(r) => {
            (r.object.parent.as_ref(), r.old_parent.as_ref())
        }
        _ => (None, None),
    }
}

fn within_prefixes(key: &Key, prefixes: &[String]) -> bool {
    prefixes
        .iter()
        .any(|prefix| prefix.is_empty() || key.is_within(&Key::from(prefix.as_str())))
}

fn describe_prefixes(p: &[String]) -> String {
    if p.is_empty() {
        "no keys".into()
    } else {
        p.iter()
            .map(|s| format!("{s}/…"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One streaming connection counted against its token until dropped.
#[derive(Debug)]
pub struct ConnectionPermit(#[allow(dead_code)] Option<herald_delivery::QuotaPermit>);

/// A request without valid Basic credentials: 401 with a Basic challenge.
pub struct BasicChallenge;

impl axum::response::IntoResponse for BasicChallenge {
    fn into_response(self) -> axum::response::Response {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"Herald\"")],
            "authentication required",
        )
            .into_response()
    }
}

/// The value of the cookie `name`, if the request carries it.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_owned())
}

/// The credentials of an `Authorization` value if its scheme is `scheme` (schemes are
/// case-insensitive, RFC 9110 §11.1).
fn auth_param<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    let (given, rest) = value.trim_start().split_once(' ')?;
    given
        .eq_ignore_ascii_case(scheme)
        .then(|| rest.trim())
        .filter(|r| !r.is_empty())
}

/// Whether a token may not take this subject: the owner name of unauthenticated and API-key
/// connections (`anonymous`), and names starting with `$`, which the server keeps for itself.
pub fn is_reserved_subject(sub: &str) -> bool {
    sub == herald_delivery::owner_name(None) || sub.starts_with('$')
}

/// The credential in a request, from the header, the query or the cookie.
fn credential(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(t) = auth_param(v, "Bearer") {
            return Some(t.to_owned());
        }
    }
    if let Some(q) = query {
        for kv in q.split('&') {
            if let Some(t) = kv.strip_prefix("access_token=") {
                return Some(percent_decode(t));
            }
        }
    }
    cookie(headers, "herald_token")
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Signs a subscriber token with an HS256 secret.
pub fn mint(secret: &str, claims: &Claims) -> anyhow::Result<String> {
    anyhow::ensure!(
        secret.len() >= 32,
        "auth.token_secret must be at least 32 bytes"
    );
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn auth(keys: &[&str]) -> (Arc<Auth>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuthConfig {
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            token_secret: Some(SECRET.into()),
            ..Default::default()
        };
        (Arc::new(Auth::new(&cfg, dir.path()).unwrap()), dir)
    }

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {t}").parse().unwrap(),
        );
        h
    }

    fn claims(prefixes: &[&str], exp_in: i64) -> Claims {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        Claims {
            sub: "alice".into(),
            exp: (now + exp_in) as u64,
            prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
            kinds: Some("new_mail,object_created".into()),
            max_subscriptions: Some(1),
            max_connections: Some(1),
            jti: Some("t-1".into()),
            iat: Some(now as u64 - 10),
        }
    }

    #[test]
    fn keys_tokens_and_their_failures() {
        let (a, _d) = auth(&["k1"]);
        assert!(matches!(
            a.authenticate(&bearer("k1"), None).unwrap(),
            Principal::Key(_)
        ));
        let e = a.authenticate(&HeaderMap::new(), None).unwrap_err();
        assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
        let t = mint(SECRET, &claims(&["alice"], 60)).unwrap();
        assert!(matches!(
            a.authenticate(&bearer(&t), None).unwrap(),
            Principal::Token(_)
        ));
        assert!(matches!(
            a.authenticate(&HeaderMap::new(), Some(&format!("x=1&access_token={t}")))
                .unwrap(),
            Principal::Token(_)
        ));
        let mut cookie = HeaderMap::new();
        cookie.insert(
            header::COOKIE,
            format!("a=b; herald_token={t}").parse().unwrap(),
        );
        assert!(matches!(
            a.authenticate(&cookie, None).unwrap(),
            Principal::Token(_)
        ));
        let expired = mint(SECRET, &claims(&["alice"], -600)).unwrap();
        let e = a.authenticate(&bearer(&expired), None).unwrap_err();
        assert_eq!(e.code(), "token_expired");
        let forged = mint(
            "another secret that is long enough!!",
            &claims(&["alice"], 60),
        )
        .unwrap();
        assert_eq!(
            a.authenticate(&bearer(&forged), None).unwrap_err().status(),
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn schemes_are_case_insensitive() {
        let (a, _d) = auth(&["k1"]);
        for scheme in ["bearer", "BEARER", "Bearer"] {
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                format!("{scheme} k1").parse().unwrap(),
            );
            assert!(
                matches!(a.authenticate(&h, None).unwrap(), Principal::Key(_)),
                "{scheme}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuthConfig {
            users: [(
                "alice@example.test".to_owned(),
                hash_password("pw").unwrap(),
            )]
            .into(),
            ..Default::default()
        };
        let users = Auth::new(&cfg, dir.path()).unwrap();
        use base64::Engine;
        let creds = base64::engine::general_purpose::STANDARD.encode("alice@example.test:pw");
        for scheme in ["basic", "BASIC", "Basic"] {
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                format!("{scheme} {creds}").parse().unwrap(),
            );
            assert_eq!(
                users.basic_user(&h).ok().flatten().as_deref(),
                Some("alice@example.test"),
                "{scheme}"
            );
        }
    }

    #[test]
    fn a_token_not_valid_yet_or_with_a_reserved_subject_is_refused() {
        let (a, _d) = auth(&[]);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let early = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &serde_json::json!({"sub": "alice", "exp": now + 7200, "nbf": now + 3600, "prefixes": ["alice"]}),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        let e = a.authenticate(&bearer(&early), None).unwrap_err();
        assert_eq!(e.code(), "token_not_yet_valid");
        for sub in ["anonymous", "$open"] {
            let mut c = claims(&[""], 60);
            c.sub = sub.into();
            let t = mint(SECRET, &c).unwrap();
            let e = a.authenticate(&bearer(&t), None).unwrap_err();
            assert_eq!(e.code(), "invalid_credentials", "{sub}");
        }
    }

    #[test]
    fn tokens_read_only_their_prefixes_and_kinds_within_limits() {
        let (a, _d) = auth(&[]);
        let p = Principal::Token(claims(&["alice@example.test"], 60));
        let f = |scope: Scope, mask: EventMask| Filter { scope, mask };
        assert!(
            a.check_filter(
                &p,
                &f(
                    Scope::Subtree("alice@example.test/inbox".into()),
                    EventKind::NewMail.into()
                )
            )
            .is_ok()
        );
        let e = a
            .check_filter(
                &p,
                &f(
                    Scope::Subtree("bob@example.test".into()),
                    EventKind::NewMail.into(),
                ),
            )
            .unwrap_err();
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        assert!(
            a.check_filter(
                &p,
                &f(
                    Scope::Exact("alice@example.testx".into()),
                    EventKind::NewMail.into()
                )
            )
            .is_err()
        );
        assert!(
            a.check_filter(
                &p,
                &f(Scope::Exact("alice@example.test/m".into()), EventMask::ALL)
            )
            .is_err()
        );
        assert!(a.require_producer(&p).is_err());
        let first = a.connect(&p).unwrap();
        assert_eq!(
            a.connect(&p).unwrap_err().status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        drop(first);
        assert!(a.connect(&p).is_ok());
    }

    #[test]
    fn created_keys_are_accepted_from_the_key_file_until_revoked() {
        let (a, dir) = auth(&[]);
        let key = crate::keys::create(dir.path(), Some("feed"), &[], true, false).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        let p = a.authenticate(&bearer(&key), None).unwrap();
        let Principal::Key(grant) = &p else {
            panic!("{p:?}")
        };
        assert!(grant.publish && !grant.admin);
        assert!(a.require_admin(&p).is_err());
        assert!(a.authenticate(&bearer("hk_other"), None).is_err());
        assert_eq!(crate::keys::revoke(dir.path(), "feed").unwrap(), 1);
        std::thread::sleep(Duration::from_millis(1100));
        a.reload();
        assert!(a.is_revoked(&p));
        assert_eq!(
            a.authenticate(&bearer(&key), None).unwrap_err().status(),
            StatusCode::UNAUTHORIZED
        );
    }
}
