//! The `herald` command-line client against a real server: publish, tail (resuming across a
//! server restart), subs and status, in text and JSON.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn run(server: &Server, args: &[&str]) -> (bool, String, String) {
    let out = herald()
        .args(args)
        .env("HERALD_SERVER", server.base())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn publish_and_status_in_text_and_json() {
    let server = Server::start();
    let (ok, out, err) = run(
        &server,
        &[
            "publish",
            "alice/inbox/m1",
            "new_mail",
            "-f",
            "message_class=IPM.Note",
            "-f",
            "message_flags=1",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "published at watermark 1");
    let (ok, out, _) = run(
        &server,
        &[
            "publish",
            "alice/inbox/m2",
            "object_created",
            "--json",
            "--idempotency-key",
            "x1",
        ],
    );
    assert!(ok);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["watermarks"][0], 2);
    let (ok, out, _) = run(
        &server,
        &[
            "publish",
            "alice/inbox/m2",
            "object_created",
            "--idempotency-key",
            "x1",
        ],
    );
    assert!(ok);
    assert!(out.contains("(replayed)"), "{out}");
    let (ok, _, err) = run(&server, &["publish", "alice/inbox/m2", "object_moved"]);
    assert!(!ok);
    assert!(
        err.contains("old_key"),
        "the error should name the field: {err}"
    );
    let (ok, out, _) = run(&server, &["status"]);
    assert!(ok);
    assert!(out.contains("watermarks 1..=2"), "{out}");
    let (ok, out, _) = run(&server, &["status", "--json"]);
    assert!(ok);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["log_last"], 2);
    let (ok, out, _) = run(&server, &["subs"]);
    assert!(ok);
    assert!(out.contains("no durable subscriptions"));
}

#[test]
fn tail_prints_events_and_resumes_across_a_server_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut server = Server::start_in(&dir, &[], &[]);
    let port = server.port;
    let mut tail = herald()
        .args(["tail", "alice", "--subtree", "--json", "--after", "0"])
        .env("HERALD_SERVER", server.base())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = tail.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |rx: &mpsc::Receiver<String>| -> Value {
        serde_json::from_str(&rx.recv_timeout(WAIT).expect("tail printed nothing")).unwrap()
    };
    assert!(run(&server, &["publish", "alice/inbox/m1", "object_created"]).0);
    assert!(run(&server, &["publish", "bob/inbox/m1", "object_created"]).0);
    assert!(run(&server, &["publish", "alice/inbox/m2", "object_created"]).0);
    assert_eq!(next(&rx)["watermark"], 1);
    assert_eq!(next(&rx)["watermark"], 3);

    // The server goes away and comes back on the same port; tail reconnects and resumes.
    assert!(server.terminate());
    drop(server);
    std::thread::sleep(Duration::from_millis(500));
    let server = Server::start_on(port, &dir, &[], &[]);
    assert!(run(&server, &["publish", "alice/inbox/m3", "object_created"]).0);
    let e = next(&rx);
    assert_eq!(
        e["watermark"], 4,
        "tail lost or repeated an event across the restart: {e}"
    );
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "a duplicate after resuming"
    );
    let _ = tail.kill();
    let _ = tail.wait();
}

#[test]
fn configuration_layers_flags_over_environment_over_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (file_port, env_port, flag_port) = (
        herald_testkit::free_port().unwrap(),
        herald_testkit::free_port().unwrap(),
        herald_testkit::free_port().unwrap(),
    );
    let conf = tmp.path().join("herald.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = \"127.0.0.1:{file_port}\"\ndata_dir = \"{}\"\n",
            tmp.path().join("d").display()
        ),
    )
    .unwrap();
    let up = |port: u16| {
        let deadline = std::time::Instant::now() + WAIT;
        while std::time::Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    };
    let spawn = |env: Option<u16>, flag: Option<u16>| {
        let mut c = herald();
        c.args(["serve", "--config"])
            .arg(&conf)
            .env("HERALD_LOG", "warn")
            .stderr(Stdio::null());
        if let Some(p) = env {
            c.env("HERALD_LISTEN", format!("127.0.0.1:{p}"));
        }
        if let Some(p) = flag {
            c.arg("--listen").arg(format!("127.0.0.1:{p}"));
        }
        c.spawn().unwrap()
    };
    for (env, flag, expect) in [
        (None, None, file_port),
        (Some(env_port), None, env_port),
        (Some(env_port), Some(flag_port), flag_port),
    ] {
        let mut child = spawn(env, flag);
        assert!(
            up(expect),
            "not listening on {expect} (env {env:?}, flag {flag:?})"
        );
        let _ = child.kill();
        let _ = child.wait();
        std::thread::sleep(Duration::from_millis(200));
    }
    // A broken file is a clear error, not a default start.
    std::fs::write(&conf, "listen = 5\n").unwrap();
    let out = herald()
        .args(["serve", "--config"])
        .arg(&conf)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen"), "{err}");
}

#[test]
fn exchange_passwords_are_stored_hashed_and_plain_text_is_refused_at_start() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("herald.toml");
    std::fs::write(
        &config,
        "[auth]\nkeys = [\"k-0123456789\"]\n[auth.users]\n\"alice@example.test\" = \"alice-pw\"\n",
    )
    .unwrap();
    let out = herald()
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(tmp.path().join("d"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "a plain-text password was accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("herald users add"), "{stderr}");
    // The CLI makes the line from a password on standard input.
    let mut child = herald()
        .args(["users", "add", "Alice@Example.test"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"alice-pw\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(
        line.starts_with("\"alice@example.test\" = \"$argon2id$"),
        "{line}"
    );
    assert!(!line.contains("alice-pw"));
}

/// `herald publish --stdin` with `input` on standard input.
fn publish_stdin(server: &Server, extra: &[&str], input: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = herald()
        .args(["publish", "--stdin", "--json"])
        .args(extra)
        .env("HERALD_SERVER", server.base())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn line(key: &str) -> String {
    format!("{{\"key\":\"{key}\",\"kind\":\"object_created\"}}\n")
}

/// Many lines in flight over one WebSocket: each line's batch appended in line order; a
/// line that fails stops the run with nothing after it appended, and the same input fed
/// again with an idempotency prefix appends only what is missing.
#[test]
fn publish_stdin_pipelines_lines_in_order_and_resumes_after_a_failure() {
    let server = Server::start();
    let mut input: String = (1..=300).map(|i| line(&format!("p/{i}"))).collect();
    // An array is one batch of two.
    input.push_str(
        "[{\"key\":\"p/301a\",\"kind\":\"object_created\"},{\"key\":\"p/301b\",\"kind\":\"object_created\"}]\n",
    );
    let (ok, out, err) = publish_stdin(&server, &[], &input);
    assert!(ok, "{err}");
    let answers: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), 301);
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a["line"], i as u64 + 1);
        assert_eq!(a["watermarks"][0], i as u64 + 1, "{a}");
    }
    assert_eq!(answers[300]["watermarks"], serde_json::json!([301, 302]));

    // Line 3 is refused: lines 1 and 2 are appended, 4 and 5 are not.
    let bad: String = [
        line("q/1"),
        line("q/2"),
        "{\"key\":\"q/3\",\"kind\":\"no_such_kind\"}\n".into(),
        line("q/4"),
        line("q/5"),
    ]
    .concat();
    let (ok, _, err) = publish_stdin(&server, &["--idempotency-prefix", "run"], &bad);
    assert!(!ok);
    assert!(err.contains("start again from line 3"), "{err}");
    let (_, status, _) = run(&server, &["status", "--json"]);
    let status: Value = serde_json::from_str(status.trim()).unwrap();
    assert_eq!(status["log_last"], 304, "q/1 and q/2 only");
    // Fixed and fed again: 1 and 2 replay, 3 to 5 are appended.
    let fixed = bad.replace("no_such_kind", "object_created");
    let (ok, out, err) = publish_stdin(&server, &["--idempotency-prefix", "run"], &fixed);
    assert!(ok, "{err}");
    let replayed: Vec<bool> = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["replayed"] == true)
        .collect();
    assert_eq!(replayed, [true, true, false, false, false]);
    let (_, status, _) = run(&server, &["status", "--json"]);
    let status: Value = serde_json::from_str(status.trim()).unwrap();
    assert_eq!(status["log_last"], 307);
}

/// Lines of a child's output as they come.
fn lines_of(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// `herald tail --after 0` over a long history: its replay's progress and then "caught up"
/// on standard error, every event in order on standard output and nothing else there, and
/// live events after it.
#[test]
fn tail_replay_shows_progress_on_stderr_and_keeps_stdout_to_events() {
    const EVENTS: u64 = 20_000;
    let server = Server::start();
    let input: String = (0..EVENTS / 100)
        .map(|b| {
            let batch: Vec<Value> = (0..100)
                .map(|i| serde_json::json!({"key": format!("t/e{}", b * 100 + i), "kind": "object_created"}))
                .collect();
            format!("{}\n", Value::Array(batch))
        })
        .collect();
    // Not `publish_stdin`: with --json its answers (every watermark) would fill the pipe
    // while the input is still being written.
    let mut publish = herald()
        .args(["publish", "--stdin"])
        .env("HERALD_SERVER", server.base())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = publish.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(input.as_bytes())
    });
    let out = publish.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut tail = herald()
        .args([
            "tail",
            "t",
            "--subtree",
            "--json",
            "--after",
            "0",
            "--progress",
        ])
        .env("HERALD_SERVER", server.base())
        .env_remove("HERALD_PROGRESS")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = lines_of(tail.stdout.take().unwrap());
    let stderr = lines_of(tail.stderr.take().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut progress = Vec::new();
    loop {
        let line = stderr
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .unwrap_or_else(|_| panic!("no \"caught up\" on stderr; it said: {progress:#?}"));
        let done = line.starts_with("caught up");
        progress.push(line);
        if done {
            break;
        }
    }
    assert_eq!(
        progress.last().map(String::as_str),
        Some("caught up at watermark 20000")
    );
    let replaying = &progress[..progress.len() - 1];
    assert!(
        replaying.len() >= 2
            && replaying
                .iter()
                .all(|l| l.starts_with("replaying  ") && l.contains(" ev/s, eta ")),
        "{progress:#?}"
    );
    assert!(
        replaying[0].starts_with("replaying  0/20,000 events"),
        "{progress:#?}"
    );
    assert!(
        replaying
            .last()
            .unwrap()
            .starts_with("replaying  20,000/20,000 events"),
        "{progress:#?}"
    );

    // Live from here on.
    assert!(run(&server, &["publish", "t/live", "object_created"]).0);
    let mut watermarks = Vec::new();
    while watermarks.last() != Some(&(EVENTS + 1)) {
        let line = stdout
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("stdout stopped after {} events", watermarks.len()));
        let event: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("stdout has a line that is not an event ({e}): {line}"));
        watermarks.push(event["watermark"].as_u64().unwrap());
    }
    assert_eq!(watermarks, (1..=EVENTS + 1).collect::<Vec<_>>());
    let _ = tail.kill();
    let _ = tail.wait();
    assert!(
        stderr.try_iter().all(|l| !l.starts_with("replaying")),
        "progress after catching up"
    );

    // Not a terminal and not asked: nothing on stderr. HERALD_PROGRESS=1 asks too.
    for (env, shown) in [(None, false), (Some("1"), true)] {
        let mut cmd = herald();
        cmd.args(["tail", "t", "--subtree", "--json", "--after", "19990"])
            .env("HERALD_SERVER", server.base())
            .env_remove("HERALD_PROGRESS")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(v) = env {
            cmd.env("HERALD_PROGRESS", v);
        }
        let mut tail = cmd.spawn().unwrap();
        let stdout = lines_of(tail.stdout.take().unwrap());
        let stderr = lines_of(tail.stderr.take().unwrap());
        for _ in 0..11 {
            stdout.recv_timeout(WAIT).expect("the replayed events");
        }
        if shown {
            let caught_up = stderr
                .iter()
                .find(|l| l.starts_with("caught up"))
                .expect("caught up with HERALD_PROGRESS=1");
            assert_eq!(caught_up, "caught up at watermark 20001");
        }
        let _ = tail.kill();
        let _ = tail.wait();
        if !shown {
            let said: Vec<String> = stderr.iter().collect();
            assert!(said.is_empty(), "stderr without a terminal: {said:#?}");
        }
    }
}
