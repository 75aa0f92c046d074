//! The HTTP API against its own OpenAPI document: `schemathesis` (PyPI) generates requests
//! from `/openapi.json` of a real server, with an API key, and checks every answer: no 5xx,
//! every status and body as documented, invalid requests refused, authentication enforced.
//! The streaming endpoints (`/v1/stream`, `/v1/ws`, `/v1/state/advise`) never end a
//! response and are left to their own tests. Positive-data acceptance is not checked: the
//! event model's rules (which fields a kind takes, keys in path form) are richer than JSON
//! Schema says, and those refusals name their field.

mod common;

use common::*;

#[test]
fn every_answer_of_the_api_matches_its_openapi_document() {
    let schemathesis = python().with_file_name("schemathesis");
    assert!(
        schemathesis.exists(),
        "{} is missing: run scripts/test (it installs schemathesis into .venv)",
        schemathesis.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_in(
        &tmp.path().join("d"),
        &[],
        &[
            ("HERALD_AUTH__KEYS", "[\"schema-key-0123456789\"]"),
            // Long-polls answer within the request timeout below.
            ("HERALD_LIMITS__MAX_WAIT", "2s"),
        ],
    );
    let seconds = if std::env::var_os("CI").is_some() {
        "60"
    } else {
        "30"
    };
    let out = std::process::Command::new(schemathesis)
        .arg("run")
        .arg(server.url("/openapi.json"))
        .args(["-H", "Authorization: Bearer schema-key-0123456789"])
        .args([
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
        ])
        .args(["--exclude-path-regex", "^/v1/(stream|ws|state/advise)$"])
        .args(["--max-time", seconds, "--request-timeout", "10"])
        .args(["--seed", "1"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("generated") || l.contains("passed") || l.contains("failed"))
        .collect();
    println!("{}", summary.join("\n"));
    assert!(
        out.status.success(),
        "schemathesis found answers that do not match the document:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
