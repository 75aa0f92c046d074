//! A real browser: headless Chromium opens the built-in watch page, whose EventSource
//! receives events from `GET /v1/stream`. Needs Debian's `chromium` (scripts/test installs it).

mod common;

use std::process::Command;

use common::*;
use serde_json::json;

fn chromium() -> &'static str {
    for c in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if std::path::Path::new(c).exists() {
            return c;
        }
    }
    panic!("chromium is not installed: run `apt-get install chromium` (scripts/test does)");
}

#[tokio::test]
async fn a_browser_event_source_receives_events_in_order() {
    let server = Server::start();
    publish_ok(
        &server,
        json!([
            {"key": "alice/inbox/m1", "kind": "new_mail", "message_class": "IPM.Note"},
            {"key": "bob/inbox/m1", "kind": "new_mail"},
            created("alice/inbox/m2")
        ]),
    )
    .await;
    let profile = tempfile::tempdir().unwrap();
    let url = server.url("/?subtree=alice&after=0&count=2");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=15000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("<title>done</title>"),
        "the page did not receive two events:\n{dom}"
    );
    let marker = "<tr class=\"event\"><td>";
    let rows: Vec<&str> = dom
        .split(marker)
        .skip(1)
        .map(|row| row.split("</td>").next().unwrap_or_default())
        .collect();
    assert_eq!(rows, ["1", "3"], "{dom}");
    assert!(dom.contains("<td>alice/inbox/m1</td>") && dom.contains("<td>alice/inbox/m2</td>"));
    assert!(!dom.contains("bob/inbox/m1"));
}
