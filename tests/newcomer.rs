//! A newcomer's first hour (issue 10, item 8): mistakes a new user makes get an answer
//! that says what is wrong and what to do, with no internals in it.

mod common;

use serde_json::json;

use common::*;

#[test]
fn start_up_mistakes_say_what_to_do() {
    let server = mysql_server_url();
    for cmd in ["serve", "migrate"] {
        let (ok, _, err) = run_chime(&[cmd, "--database-url", &server]);
        assert!(!ok, "{cmd} started without a database name");
        assert!(
            err.contains("names no database") && err.contains("CREATE DATABASE"),
            "{cmd}: {err}"
        );
        assert!(
            !err.contains("unexpected null"),
            "{cmd}: internals leak: {err}"
        );
        let (ok, _, err) = run_chime(&[cmd, "--database-url", "sqlite:///no/such/dir/chime.db"]);
        assert!(!ok);
        assert!(
            err.contains("/no/such/dir") && err.contains("does not exist"),
            "{cmd}: {err}"
        );
        assert!(!err.contains("server is up"), "{cmd}: {err}");
    }
    let (ok, _, err) = run_chime(&["serve", "--http-addr", "nope"]);
    assert!(!ok);
    assert!(err.contains("host:port or :port"), "{err}");

    let (_, help, _) = run_chime(&["--help"]);
    assert!(help.contains("CHIME_LOG"), "{help}");
    assert!(help.contains("gRPC"), "{help}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mistyped_environment_variable_is_reported() {
    let db = fresh_sqlite();
    let node =
        Chime::start_with_env(&db, "n1", &[], &[("CHIME_HTTP_ADRR", Some("127.0.0.1:1"))]).await;
    assert!(
        node.logs().iter().any(|l| l.contains(
            "unknown environment variable CHIME_HTTP_ADRR is ignored; did you mean CHIME_HTTP_ADDR?"
        )),
        "{:?}",
        node.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn body_mistakes_get_plain_answers() {
    let db = fresh_sqlite();
    let node = Chime::start(&db, "n1", &[]).await;
    let r = node
        .put("/v1/jobs/a", &http_job("@hourly", "example.com/hook"))
        .await;
    let msg = r.assert_error(422);
    assert!(
        msg.contains("has no scheme") && msg.contains("http://example.com/hook"),
        "{r}"
    );
    let r = node
        .put(
            "/v1/jobs/a",
            &json!({"shedule": "@hourly", "callback": {"http": {"url": "http://h/"}}}),
        )
        .await;
    let msg = r.assert_error(422);
    assert!(msg.contains("did you mean `schedule`?"), "{r}");
    for body in [
        json!({"schedule": "@hourly", "callback": "http://h/"}),
        json!({"schedule": "@hourly", "callback": {"http": {"url": "http://h/", "timeout_ms": "5s"}}}),
    ] {
        let r = node.put("/v1/jobs/a", &body).await;
        let msg = r.assert_error(422);
        for internal in ["struct", "i64", "u64", "Input"] {
            assert!(!msg.contains(internal), "{internal} in {r}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_last_page_has_no_cursor() {
    let db = fresh_sqlite();
    let node = Chime::start(&db, "n1", &[]).await;
    for id in ["a", "b", "c"] {
        let r = node
            .put(
                &format!("/v1/jobs/{id}"),
                &http_job("@hourly", "http://127.0.0.1:9/"),
            )
            .await;
        assert_eq!(r.status, 201, "{r}");
    }
    let r = node.get("/v1/jobs?limit=3").await;
    assert_eq!(r.json["jobs"].as_array().map(Vec::len), Some(3), "{r}");
    assert!(r.json["next_cursor"].is_null(), "a full last page: {r}");
    let r = node.get("/v1/jobs?limit=2").await;
    let cursor = r.json["next_cursor"]
        .as_str()
        .expect("a cursor")
        .to_string();
    let r = node.get(&format!("/v1/jobs?limit=2&cursor={cursor}")).await;
    assert_eq!(r.json["jobs"].as_array().map(Vec::len), Some(1), "{r}");
    assert!(r.json["next_cursor"].is_null(), "{r}");
}
