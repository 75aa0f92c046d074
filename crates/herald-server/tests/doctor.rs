//! `herald doctor` on real data directories: one a real server wrote and left, one it still
//! holds, damaged logs, a directory others can read, a network address without credentials,
//! configuration that does not load.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;

/// What one run of `herald doctor` said.
struct Doctor {
    exit: i32,
    out: String,
}

impl Doctor {
    /// The lines of findings of `check` (their first line only).
    fn lines(&self, check: &str) -> Vec<&str> {
        self.out
            .lines()
            .filter(|l| !l.starts_with(' ') && l[6..].starts_with(&format!("{check}: ")))
            .collect()
    }

    /// The fix printed under the first finding of `check` at `level`.
    fn fix(&self, level: &str, check: &str) -> Option<&str> {
        let head = format!("{level:<4}  {check}: ");
        let mut lines = self.out.lines().skip_while(|l| !l.starts_with(&head));
        lines.next()?;
        lines.next()?.trim().strip_prefix("fix: ")
    }
}

fn doctor(data_dir: &Path, args: &[&str]) -> Doctor {
    let out = herald()
        .arg("doctor")
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("HERALD_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "doctor wrote to stderr: {stderr}");
    Doctor {
        exit: out.status.code().expect("exited"),
        out: String::from_utf8(out.stdout).unwrap(),
    }
}

/// A loopback address nothing listens on.
fn free_listen() -> String {
    format!("127.0.0.1:{}", herald_testkit::free_port().unwrap())
}

/// A data directory a real server wrote `n` events to and then left cleanly.
async fn written_and_stopped(n: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut server = Server::start_in(&dir, &[], &[]);
    let events: Vec<_> = (0..n).map(|i| created(&format!("a/m{i}"))).collect();
    publish_ok(&server, serde_json::Value::Array(events)).await;
    assert!(server.terminate(), "the server did not stop cleanly");
    (tmp, dir)
}

#[tokio::test]
async fn a_data_directory_a_server_wrote_and_left_is_all_ok() {
    let (_tmp, dir) = written_and_stopped(25).await;
    let d = doctor(&dir, &["--listen", &free_listen()]);
    assert_eq!(d.exit, 0, "{}", d.out);
    for line in d.out.lines() {
        // The free space is the machine's: a nearly full disk is a true warning, not this
        // test's failure.
        let disk = line.starts_with("warn  disk space: ");
        assert!(
            line.starts_with("ok    ") || disk,
            "not ok: {line}\n{}",
            d.out
        );
    }
    for check in ["config", "data dir", "disk space", "log", "listen", "auth"] {
        assert_eq!(d.lines(check).len(), 1, "one line for {check}:\n{}", d.out);
    }
    let log = d.lines("log")[0];
    assert!(
        log.contains("passed the integrity check") && log.contains("watermarks 1..=25 (25 events)"),
        "{log}"
    );
    assert!(
        d.lines("disk space")[0].contains(" free of "),
        "the figures are printed: {}",
        d.out
    );

    // The same findings as JSON, one object per line.
    let j = doctor(&dir, &["--listen", &free_listen(), "--json"]);
    assert_eq!(j.exit, 0);
    let objects: Vec<serde_json::Value> = j
        .out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objects.len(), d.out.lines().count());
    let log = objects.iter().find(|o| o["check"] == "log").unwrap();
    assert_eq!(log["level"], "ok");
    assert!(log.get("fix").is_none());
}

#[tokio::test]
async fn a_data_directory_others_can_read_is_a_warning_with_chmod() {
    let (_tmp, dir) = written_and_stopped(1).await;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = doctor(&dir, &["--listen", &free_listen()]);
    assert_eq!(d.exit, 0, "a warning does not fail: {}", d.out);
    let warned: Vec<_> = d
        .lines("data dir")
        .into_iter()
        .filter(|l| l.starts_with("warn") && l.contains("mode 0755"))
        .collect();
    assert_eq!(warned.len(), 1, "{}", d.out);
    assert_eq!(
        d.fix("warn", "data dir"),
        Some(format!("chmod 700 {}", dir.display()).as_str())
    );
}

#[tokio::test]
async fn a_log_overwritten_truncated_or_rotten_fails_with_a_fix() {
    let (_tmp, dir) = written_and_stopped(50).await;
    let file = dir.join("events.redb");
    let original = std::fs::read(&file).unwrap();
    let garbage: Vec<u8> = (0..original.len()).map(|i| (i * 7 + 3) as u8).collect();
    let truncated = original[..original.len() / 2].to_vec();
    // Bit rot: one byte flipped in every page but the header. The store can panic on such
    // pages; that too must come out as a finding.
    let mut rotten = original.clone();
    for page in (4096..rotten.len()).step_by(4096) {
        rotten[page + 200] ^= 0xff;
    }
    for (what, bytes) in [
        ("garbage", garbage),
        ("truncated", truncated),
        ("rotten", rotten),
    ] {
        std::fs::write(&file, &bytes).unwrap();
        let d = doctor(&dir, &["--listen", &free_listen()]);
        assert_eq!(d.exit, 1, "{what}: {}", d.out);
        let log = d.lines("log");
        assert!(
            log.len() == 1 && log[0].starts_with("FAIL  log: "),
            "{what}: {}",
            d.out
        );
        let fix = d.fix("FAIL", "log").unwrap_or_default();
        assert!(
            fix.contains("move the file aside") && fix.contains("backup"),
            "{what}: {fix}"
        );
    }
}

#[tokio::test]
async fn a_log_held_by_a_running_server_is_a_warning_not_a_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let server = Server::start_in(&dir, &[], &[]);
    publish_ok(&server, serde_json::json!([created("a/m1")])).await;
    let listen = format!("127.0.0.1:{}", server.port);
    let d = doctor(&dir, &["--listen", &listen]);
    assert_eq!(d.exit, 0, "{}", d.out);
    let log = d.lines("log");
    assert!(
        log[0].starts_with("warn  log: ") && log[0].contains("in use by a running server"),
        "{}",
        d.out
    );
    let listen = d.lines("listen");
    assert!(
        listen[0].starts_with("warn  listen: ") && listen[0].contains("a running herald?"),
        "{}",
        d.out
    );
    // Checking did not disturb the server.
    publish_ok(&server, serde_json::json!([created("a/m2")])).await;
}

#[test]
fn a_network_address_without_api_keys_fails_and_short_keys_warn() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let open = format!("0.0.0.0:{}", herald_testkit::free_port().unwrap());
    let d = doctor(&dir, &["--listen", &open]);
    assert_eq!(d.exit, 1, "{}", d.out);
    let auth = d.lines("auth");
    assert!(
        auth[0].starts_with("FAIL  auth: ") && auth[0].contains("anyone on the network"),
        "{}",
        d.out
    );
    assert!(
        d.fix("FAIL", "auth")
            .unwrap_or_default()
            .contains("API keys"),
        "{}",
        d.out
    );

    let out = herald()
        .args(["doctor", "--listen", &open, "--data-dir"])
        .arg(&dir)
        .env(
            "HERALD_AUTH__KEYS",
            r#"["short", "a-long-enough-random-key"]"#,
        )
        .env_remove("HERALD_CONFIG")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("ok    auth: ") && text.contains("requests need credentials"),
        "{text}"
    );
    assert!(
        text.contains("warn  auth: auth.keys[0] is 5 characters long"),
        "{text}"
    );
    assert!(!text.contains("short"), "a key is never printed: {text}");
    assert!(!text.contains("auth.keys[1]"), "{text}");
}

#[test]
fn a_configuration_that_does_not_load_or_validate_fails_with_the_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let config = tmp.path().join("herald.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:1\"\nlisten_port = 3\n").unwrap();
    let d = doctor(&dir, &["--config", config.to_str().unwrap()]);
    assert_eq!(d.exit, 1, "{}", d.out);
    let line = d.lines("config");
    assert!(
        line[0].starts_with("FAIL  config: ")
            && line[0].contains("listen_port")
            && line[0].contains("herald.toml"),
        "the error names the key and the file: {}",
        d.out
    );
    assert!(d.fix("FAIL", "config").is_some());

    std::fs::write(&config, "[auth]\ntoken_secret = \"too short\"\n").unwrap();
    let d = doctor(&dir, &["--config", config.to_str().unwrap()]);
    assert_eq!(d.exit, 1, "{}", d.out);
    assert!(
        d.lines("config")[0].contains("auth.token_secret must be at least 32 bytes"),
        "{}",
        d.out
    );

    let missing = tmp.path().join("missing.toml");
    let d = doctor(&dir, &["--config", missing.to_str().unwrap()]);
    assert_eq!(d.exit, 1, "{}", d.out);
    assert!(d.lines("config")[0].contains("does not exist"), "{}", d.out);
}
