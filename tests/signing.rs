//! Signed callbacks: a receiver verifies `X-Chime-Signature` with a standard HMAC library.

mod common;

use std::time::Duration;

use common::*;
use hmac::{Hmac, Mac};
use sha2::Sha256;

fn expected_signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test(flavor = "multi_thread")]
async fn callbacks_of_a_job_with_a_secret_are_signed() {
    let db = fresh_sqlite();
    let rx = Receiver::start(Script::always(200)).await;
    let node = Chime::start(&db, "n1", &[]).await;
    let mut signed = http_job("@every 1s", &rx.url());
    signed["secret"] = "s3cret-key".into();
    assert_eq!(node.put("/v1/jobs/signed", &signed).await.status, 201);
    assert_eq!(
        node.put("/v1/jobs/plain", &http_job("@every 1s", &rx.url()))
            .await
            .status,
        201
    );
    // The secret is write-only.
    let got = node.get("/v1/jobs/signed").await;
    assert!(got.json.get("secret").is_none(), "{got}");
    assert!(!got.text.contains("s3cret-key"), "{got}");

    let ok = wait_until(Duration::from_secs(10), async || {
        let reqs = rx.requests();
        reqs.iter().any(|r| r.job_id() == "signed") && reqs.iter().any(|r| r.job_id() == "plain")
    })
    .await;
    assert!(ok, "both jobs fired");
    for r in rx.requests() {
        match r.job_id() {
            "signed" => {
                let ts = r.header("x-chime-timestamp").expect("timestamp header");
                let secs: i64 = ts.parse().expect("unix seconds");
                assert!((secs - now_ms() / 1000).abs() < 60, "fresh timestamp {ts}");
                let sig = r.header("x-chime-signature").expect("signature header");
                assert_eq!(sig, expected_signature(b"s3cret-key", ts, &r.raw), "{r:?}");
                assert_ne!(sig, expected_signature(b"other-key", ts, &r.raw));
            }
            _ => {
                assert!(r.header("x-chime-signature").is_none(), "{r:?}");
                assert!(r.header("x-chime-timestamp").is_none(), "{r:?}");
            }
        }
    }
}
