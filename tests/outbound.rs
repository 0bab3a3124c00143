//! Callback targets on refused networks: rejected at write time when the URL is an IP
//! literal, and refused at connect time (never retried) when a host name resolves there.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn metadata_addresses_are_refused_and_lists_apply() {
    let db = fresh_sqlite();
    let rx = Receiver::start(Script::always(200)).await;
    // Treat loopback as a refused network, to see both paths against a real receiver.
    let node = Chime::start(&db, "n1", &["--outbound-deny", "127.0.0.0/8,::1/128"]).await;

    // Cloud metadata is refused by default, IP literal: 422 naming the field, nothing stored.
    let r = node
        .put(
            "/v1/jobs/meta",
            &http_job("@every 1s", "http://169.254.169.254/latest/meta-data/"),
        )
        .await;
    let msg = r.assert_error(422).to_string();
    assert!(msg.starts_with("callback.http.url:"), "{msg}");
    assert_eq!(node.get("/v1/jobs/meta").await.status, 404);

    // A denied IP literal: same.
    let r = node
        .put("/v1/jobs/lit", &http_job("@every 1s", &rx.url()))
        .await;
    r.assert_error(422);

    // A host name that resolves only to denied addresses: accepted (DNS may change), but
    // every connection is refused and the delivery fails at once, without retries.
    let port = rx
        .url()
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let url = format!("http://localhost:{port}/hook");
    let r = node
        .put("/v1/jobs/name", &http_job("@every 1s", &url))
        .await;
    assert_eq!(r.status, 201, "{r}");
    let failed = wait_for(Duration::from_secs(10), async || {
        node.executions("name")
            .await
            .into_iter()
            .find(|e| e["status"] == "failed")
    })
    .await
    .expect("the delivery fails");
    assert_eq!(
        failed["attempts"], 1,
        "a refused destination is not retried: {failed}"
    );
    assert!(
        failed["last_error"].as_str().unwrap().contains("refused"),
        "{failed}"
    );
    assert_eq!(rx.count(), 0, "nothing reached the refused address");
}

#[tokio::test(flavor = "multi_thread")]
async fn allow_list_readmits_a_network() {
    let db = fresh_sqlite();
    let node = Chime::start(&db, "n1", &["--outbound-allow", "169.254.169.254"]).await;
    let r = node
        .put(
            "/v1/jobs/meta",
            &http_job("@hourly", "http://169.254.169.254/latest/meta-data/"),
        )
        .await;
    assert_eq!(r.status, 201, "{r}");
    let r = node
        .put(
            "/v1/jobs/other",
            &http_job("@hourly", "http://169.254.0.7/"),
        )
        .await;
    r.assert_error(422);
    // A bad list is a start-up error naming the setting.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chime"))
        .args([
            "serve",
            "--outbound-deny",
            "10.0.0.0/33",
            "--database-url",
            db.url(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("outbound") && err.contains("10.0.0.0/33"),
        "{err}"
    );
}

/// A callback that answers with a redirect is not followed: a 3xx is a failed attempt, so a
/// reachable URL cannot bounce chime (with the job's headers) to a refused address.
#[tokio::test(flavor = "multi_thread")]
async fn redirects_are_not_followed() {
    let db = fresh_sqlite();
    let secret = Receiver::start_on("127.0.0.2", Script::always(200)).await;
    let bouncer = Receiver::start(Script::redirect(307, &format!("{}/secret", secret.url()))).await;
    let node = Chime::start(&db, "n1", &["--outbound-deny", "127.0.0.2/32"]).await;

    // The refused address itself is rejected at write time.
    let r = node
        .put("/v1/jobs/direct", &http_job("@every 1s", &secret.url()))
        .await;
    r.assert_error(422);

    let mut job = http_job("@every 1s", &bouncer.url());
    job["callback"]["http"]["headers"] = serde_json::json!({"Metadata-Flavor": "Google"});
    let r = node.put("/v1/jobs/bounce", &job).await;
    assert_eq!(r.status, 201, "{r}");
    let failed = wait_for(Duration::from_secs(10), async || {
        node.executions("bounce")
            .await
            .into_iter()
            .find(|e| e["status"] == "failed")
    })
    .await
    .expect("the redirected delivery fails");
    assert_eq!(failed["attempts"], 1, "a redirect is not retried: {failed}");
    let err = failed["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("307") && err.contains("redirect") && err.contains("/secret"),
        "last_error names the redirect and where it pointed: {failed}"
    );
    assert!(bouncer.count() >= 1, "the job's own URL was called");
    // Give a followed redirect time to land before concluding it did not.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        secret.count(),
        0,
        "the refused address was reached through the redirect: {:?}",
        secret.requests()
    );
    assert!(
        node.executions("bounce")
            .await
            .iter()
            .all(|e| e["status"] != "succeeded"),
        "no redirected delivery is recorded as succeeded"
    );
}
