//! `herald doctor`: checks a configuration and its data directory without starting a server,
//! and says what to fix. Every check yields findings of three levels; only a `FAIL` makes the
//! command exit non-zero.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{Config, LogBackend, Overrides};

/// How serious a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Nothing to do.
    Ok,
    /// Works, but should be looked at.
    Warn,
    /// The server would not start, or would lose or expose data.
    Fail,
}

impl Level {
    /// The word printed at the start of a line.
    pub fn label(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        }
    }
}

/// One result of one check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What was checked (`config`, `data dir`, `disk space`, `log`, `listen`, `auth`).
    pub check: &'static str,
    /// How serious it is.
    pub level: Level,
    /// What was found, with the figures behind it.
    pub finding: String,
    /// What to do about it, when the level is not `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: &'static str, finding: impl Into<String>) -> Finding {
        Finding {
            check,
            level: Level::Ok,
            finding: finding.into(),
            fix: None,
        }
    }

    fn warn(check: &'static str, finding: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            check,
            level: Level::Warn,
            finding: finding.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(check: &'static str, finding: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            check,
            level: Level::Fail,
            finding: finding.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Free space below which the log cannot be trusted to take the next writes.
const DISK_FAIL_BYTES: u64 = 64 << 20;
/// Free space below which an operator should act soon.
const DISK_WARN_BYTES: u64 = 1 << 30;
/// The same floors as shares of the filesystem, in percent.
const DISK_FAIL_PERCENT: f64 = 1.0;
const DISK_WARN_PERCENT: f64 = 10.0;
/// API keys shorter than this are guessable.
const MIN_KEY_CHARS: usize = 16;

/// Runs every check on the configuration `serve` would load from `file` and `overrides`.
/// A configuration that does not load stops the checks there: the rest depend on it.
pub fn run(file: Option<&Path>, overrides: &Overrides) -> Vec<Finding> {
    let config = match Config::load(file, overrides) {
        Ok(c) => c,
        Err(e) => {
            return vec![Finding::fail(
                "config",
                format!("does not load: {e}"),
                "correct the file or the HERALD_* variable named above (`herald serve --help` lists the flags)",
            )];
        }
    };
    let mut findings = vec![check_config(&config, file)];
    findings.extend(check_data_dir(&config.data_dir));
    findings.push(check_disk(&config.data_dir));
    findings.push(check_log(&config));
    findings.push(check_listen(config.listen));
    findings.extend(check_auth(&config, file));
    findings
}

/// Writes the findings as lines for people, or one JSON object per line.
pub fn print(findings: &[Finding], json: bool, out: &mut dyn Write) -> std::io::Result<()> {
    for f in findings {
        if json {
            serde_json::to_writer(&mut *out, f)?;
            writeln!(out)?;
        } else {
            writeln!(out, "{:<4}  {}: {}", f.level.label(), f.check, f.finding)?;
            if let Some(fix) = &f.fix {
                writeln!(out, "      fix: {fix}")?;
            }
        }
    }
    out.flush()
}

/// Whether any finding is a failure.
pub fn failed(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.level == Level::Fail)
}

/// The validations `serve` makes before it opens anything (exposure is `check_auth`'s).
fn check_config(config: &Config, file: Option<&Path>) -> Finding {
    let fail = |e: String| {
        Finding::fail(
            "config",
            format!("does not validate: {e}"),
            "correct the setting named above",
        )
    };
    if let Err(e) = config.check_timers() {
        return fail(e);
    }
    if let Err(e) = config.egress() {
        return fail(e);
    }
    if let Err(e) = crate::auth::Auth::new(&config.auth, &config.data_dir) {
        return fail(format!("{e:#}"));
    }
    if let Err(e) = crate::hooks::from_config(&config.hooks) {
        return fail(format!("{e:#}"));
    }
    let source = match file {
        Some(f) => format!("{} and the environment", f.display()),
        None => "defaults and the environment".to_owned(),
    };
    let backend = match config.log.backend {
        LogBackend::Embedded => "embedded",
        LogBackend::Jetstream => "jetstream",
    };
    Finding::ok(
        "config",
        format!("loaded from {source}; log backend {backend}"),
    )
}

/// The data directory: there (or creatable), a directory, writable, private, ours.
fn check_data_dir(dir: &Path) -> Vec<Finding> {
    const CHECK: &str = "data dir";
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return vec![match nearest_existing(dir) {
                Some(parent) if writable(&parent) => Finding::ok(
                    CHECK,
                    format!(
                        "{} does not exist yet; serve creates it (in {}, which is writable)",
                        dir.display(),
                        parent.display()
                    ),
                ),
                Some(parent) => Finding::fail(
                    CHECK,
                    format!(
                        "{} does not exist and {} is not writable by this user, so serve cannot create it",
                        dir.display(),
                        parent.display()
                    ),
                    format!(
                        "create it as the user that runs herald: mkdir -p {0} && chmod 700 {0}",
                        dir.display()
                    ),
                ),
                None => Finding::fail(
                    CHECK,
                    format!(
                        "{} does not exist and has no existing parent",
                        dir.display()
                    ),
                    "give --data-dir an absolute path on a mounted filesystem",
                ),
            }];
        }
        Err(e) => {
            return vec![Finding::fail(
                CHECK,
                format!("{}: {e}", dir.display()),
                "make the directory and its parents readable by the user that runs herald",
            )];
        }
    };
    if !meta.is_dir() {
        return vec![Finding::fail(
            CHECK,
            format!("{} is not a directory", dir.display()),
            "point --data-dir at a directory (or move the file aside)",
        )];
    }
    let mut findings = Vec::new();
    let probe = dir.join(format!(".herald-doctor-{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .and_then(|mut f| f.write_all(b"herald doctor\n"))
        .and_then(|()| std::fs::remove_file(&probe));
    match written {
        Ok(()) => findings.push(Finding::ok(
            CHECK,
            format!("{} is a writable directory", dir.display()),
        )),
        Err(e) => {
            let _ = std::fs::remove_file(&probe);
            findings.push(Finding::fail(
                CHECK,
                format!("cannot write in {}: {e}", dir.display()),
                format!(
                    "run herald as the directory's owner, or chown -R <user> {}",
                    dir.display()
                ),
            ));
        }
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        findings.push(Finding::warn(
            CHECK,
            format!(
                "{} has mode {mode:04o}: group or others can reach the log, the key hashes and the revocations",
                dir.display()
            ),
            format!("chmod 700 {}", dir.display()),
        ));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        findings.push(Finding::warn(
            CHECK,
            format!(
                "{} is owned by uid {}, not by this user (uid {me})",
                dir.display(),
                meta.uid()
            ),
            format!(
                "run herald as the directory's owner, or chown -R {me} {}",
                dir.display()
            ),
        ));
    }
    findings
}

/// The closest ancestor of `path` that exists (what `create_dir_all` would start from).
fn nearest_existing(path: &Path) -> Option<PathBuf> {
    let absolute = std::path::absolute(path).ok()?;
    absolute
        .ancestors()
        .skip(1)
        .find(|p| p.exists())
        .map(Path::to_owned)
}

/// Whether this user may create entries in `dir`.
fn writable(dir: &Path) -> bool {
    use rustix::fs::{Access, access};
    access(dir, Access::WRITE_OK | Access::EXEC_OK).is_ok()
}

/// Free bytes and inodes on the data directory's filesystem.
fn check_disk(dir: &Path) -> Finding {
    const CHECK: &str = "disk space";
    let on = if dir.exists() {
        dir.to_owned()
    } else {
        match nearest_existing(dir) {
            Some(p) => p,
            None => {
                return Finding::warn(
                    CHECK,
                    format!("no existing directory on the way to {}", dir.display()),
                    "create the data directory, then check again",
                );
            }
        }
    };
    let st = match rustix::fs::statvfs(&on) {
        Ok(s) => s,
        Err(e) => {
            return Finding::warn(
                CHECK,
                format!(
                    "cannot read the filesystem's figures for {}: {e}",
                    on.display()
                ),
                "check the free space by hand (df -h, df -i)",
            );
        }
    };
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    let total = st.f_blocks.saturating_mul(st.f_frsize);
    let free_pct = percent(free, total);
    let mut text = format!("{} free of {} ({free_pct:.1}%)", bytes(free), bytes(total));
    // Some filesystems (btrfs, many network ones) have no inode limit and say 0.
    let inodes = (st.f_files > 0).then(|| {
        let pct = percent(st.f_favail, st.f_files);
        text.push_str(&format!(
            ", {} of {} inodes free ({pct:.1}%)",
            thousands(st.f_favail),
            thousands(st.f_files)
        ));
        pct
    });
    let fix = format!(
        "free space on the filesystem of {}, lower [retention] (max_age, max_bytes), or move the data directory to a larger disk",
        on.display()
    );
    let low_inodes_fail = inodes.is_some_and(|p| p < DISK_FAIL_PERCENT);
    let low_inodes_warn = inodes.is_some_and(|p| p < DISK_WARN_PERCENT);
    if free < DISK_FAIL_BYTES || free_pct < DISK_FAIL_PERCENT || low_inodes_fail {
        Finding::fail(CHECK, format!("{text}: too little to write the log"), fix)
    } else if free < DISK_WARN_BYTES || free_pct < DISK_WARN_PERCENT || low_inodes_warn {
        Finding::warn(CHECK, format!("{text}: running low"), fix)
    } else {
        Finding::ok(CHECK, text)
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        100.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// `n` bytes in binary units, for people.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `n` with thousands separated by commas.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The embedded log's integrity, or the JetStream log's servers.
fn check_log(config: &Config) -> Finding {
    const CHECK: &str = "log";
    if config.log.backend == LogBackend::Jetstream {
        let servers = &config.jetstream.servers;
        return if servers.is_empty() {
            Finding::fail(
                CHECK,
                "the log is on NATS JetStream but jetstream.servers is empty",
                "set jetstream.servers (or --jetstream-servers) to the cluster's nats:// URLs",
            )
        } else {
            Finding::ok(
                CHECK,
                format!(
                    "the log is remote, on NATS JetStream stream {} at {} (not connected to from here)",
                    config.jetstream.stream,
                    servers.join(", ")
                ),
            )
        };
    }
    let path = config.data_dir.join(herald_log::LOG_FILE);
    if !path.exists() {
        return Finding::ok(
            CHECK,
            format!("{} does not exist yet; serve creates it", path.display()),
        );
    }
    // A damaged file can make the store panic; the check reports that as damage, and the
    // panic's own message would only be noise on the terminal.
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        tracing::debug!(%info, "the store panicked while checking the log");
    }));
    let checked = herald_log::check(&path);
    std::panic::set_hook(previous_hook);
    match checked {
        Ok(r) => {
            let held = if r.events == 0 {
                format!("no events (next watermark {})", r.bounds.last.0 + 1)
            } else {
                format!(
                    "watermarks {}..={} ({} events)",
                    r.bounds.first.0,
                    r.bounds.last.0,
                    thousands(r.events)
                )
            };
            Finding::ok(
                CHECK,
                format!(
                    "{} ({}) passed the integrity check: {held}, {} durable subscriptions",
                    path.display(),
                    bytes(r.file_bytes),
                    thousands(r.subscriptions)
                ),
            )
        }
        Err(herald_log::LogError::Locked { .. }) => Finding::warn(
            CHECK,
            format!(
                "{} is in use by a running server; stop it to check",
                path.display()
            ),
            "stop the server (SIGTERM), run herald doctor again, then start it",
        ),
        Err(e @ herald_log::LogError::Corrupt { .. }) => Finding::fail(
            CHECK,
            e.to_string(),
            format!(
                "keep the server stopped; move the file aside (mv {0} {0}.damaged) and restore the data directory from a backup. Without one, serve starts an empty log whose watermarks begin again at 1: clients holding later watermarks must start over",
                path.display()
            ),
        ),
        Err(e) => Finding::fail(
            CHECK,
            e.to_string(),
            "make the file readable and writable by the user that runs herald",
        ),
    }
}

/// Whether the address can be bound now.
fn check_listen(addr: SocketAddr) -> Finding {
    const CHECK: &str = "listen";
    match TcpListener::bind(addr) {
        Ok(listener) => {
            drop(listener);
            Finding::ok(CHECK, format!("{addr} can be bound"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Finding::warn(
            CHECK,
            format!("{addr}: something listens there already — a running herald?"),
            format!("stop what listens on {addr} (ss -ltnp), or give serve another --listen"),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Finding::fail(
            CHECK,
            format!("{addr} cannot be bound by this user: {e}"),
            "use a port above 1023, or grant the binary CAP_NET_BIND_SERVICE",
        ),
        Err(e) => Finding::fail(
            CHECK,
            format!("{addr} cannot be bound: {e}"),
            "listen on an address of one of this machine's interfaces (or 0.0.0.0)",
        ),
    }
}

/// Who can reach the API, and the credentials that guard it.
fn check_auth(config: &Config, file: Option<&Path>) -> Vec<Finding> {
    const CHECK: &str = "auth";
    let auth = &config.auth;
    let addr = config.listen;
    let loopback = addr.ip().is_loopback();
    let mut findings = Vec::new();
    let file_keys = crate::keys::list(&config.data_dir)
        .map(|keys| keys.iter().filter(|k| k.revoked.is_none()).count())
        .unwrap_or(0);
    let set_keys = "set API keys: HERALD_AUTH__KEYS='[\"<at least 16 random characters>\"]' (or [auth] keys in the file), and auth.token_secret for subscriber tokens";
    if loopback {
        if auth.enabled() || file_keys > 0 {
            findings.push(Finding::ok(
                CHECK,
                format!("{addr} is loopback, and requests need credentials"),
            ));
        } else {
            findings.push(Finding::ok(
                CHECK,
                format!("{addr} is loopback: open without credentials, to this machine only"),
            ));
        }
    } else if auth.enabled() {
        findings.push(Finding::ok(
            CHECK,
            format!(
                "{addr} is reachable from the network and requests need credentials ({} API keys configured, {} made with `herald keys create`)",
                auth.keys.len(),
                file_keys
            ),
        ));
    } else if auth.allow_open {
        findings.push(Finding::warn(
            CHECK,
            format!(
                "{addr} is not loopback and no authentication is configured (auth.allow_open = true): anyone on the network can publish, read every key and administer the server"
            ),
            set_keys,
        ));
    } else {
        let keys_note = if file_keys > 0 {
            format!(
                " ({file_keys} keys made with `herald keys create` do not count: serve checks the configuration)"
            )
        } else {
            String::new()
        };
        findings.push(Finding::fail(
            CHECK,
            format!(
                "{addr} is not loopback and no authentication is configured{keys_note}: serve refuses to start, and opened with auth.allow_open anyone on the network could publish, read every key and administer the server"
            ),
            set_keys,
        ));
    }
    for (i, key) in auth.keys.iter().enumerate() {
        let chars = key.chars().count();
        if chars < MIN_KEY_CHARS {
            findings.push(Finding::warn(
                CHECK,
                format!("auth.keys[{i}] is {chars} characters long: guessable"),
                format!(
                    "replace it with at least {MIN_KEY_CHARS} random characters (e.g. openssl rand -hex 24), or make one with `herald keys create`"
                ),
            ));
        }
    }
    if !loopback && config.webhooks.allow_loopback == Some(true) {
        findings.push(Finding::warn(
            CHECK,
            "webhooks.allow_loopback = true on a server reachable from the network: a subscriber can make it call services listening on this machine's loopback",
            "remove webhooks.allow_loopback, or allow only the networks webhooks need (webhooks.allowed_networks)",
        ));
    }
    for net in &config.webhooks.allowed_networks {
        if net
            .parse::<ipnet::IpNet>()
            .is_ok_and(|n| n.prefix_len() == 0)
        {
            findings.push(Finding::warn(
                CHECK,
                format!(
                    "webhooks.allowed_networks has {net}: webhooks may reach every private and loopback address"
                ),
                "list only the networks that webhook receivers are on",
            ));
        }
    }
    let holds_secrets =
        !auth.keys.is_empty() || auth.token_secret.is_some() || !auth.users.is_empty();
    if let Some(file) = file.filter(|_| holds_secrets) {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(file) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                findings.push(Finding::warn(
                    CHECK,
                    format!(
                        "{} holds credentials ([auth]) and has mode {mode:04o}: group or others can read them",
                        file.display()
                    ),
                    format!("chmod 600 {}", file.display()),
                ));
            }
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(64 << 20), "64.0 MiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn a_line_per_finding_and_a_fix_under_what_is_not_ok() {
        let findings = [
            Finding::ok("config", "fine"),
            Finding::warn("data dir", "mode 0755", "chmod 700 d"),
            Finding::fail("log", "damaged", "restore"),
        ];
        let mut out = Vec::new();
        print(&findings, false, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ok    config: fine\nwarn  data dir: mode 0755\n      fix: chmod 700 d\nFAIL  log: damaged\n      fix: restore\n"
        );
        let mut out = Vec::new();
        print(&findings[2..], true, &mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["level"], "fail");
        assert_eq!(v["check"], "log");
        assert_eq!(v["fix"], "restore");
        assert!(failed(&findings));
        assert!(!failed(&findings[..2]));
    }
}
