//! gRPC callbacks over TLS, end to end: a tonic receiver presenting a certificate for
//! `localhost` and 127.0.0.1 signed by a CA made for the test. A chime told to trust that CA
//! (`SSL_CERT_FILE`, read by the native-roots loader) delivers to `https://localhost:PORT`
//! and `https://127.0.0.1:PORT`; a chime with only the system's roots refuses the
//! certificate and sends nothing; a plain-text `http://` target to the TLS port fails too.

mod common;

use std::time::Duration;

use common::grpc::{GrpcReceiver, GrpcScript};
use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::{Value, json};
use tonic::Code;

/// A CA made for one test, a server certificate it signed, and the CA's PEM in a file.
struct Pki {
    /// The CA certificate alone, as `SSL_CERT_FILE` for a chime that trusts it.
    ca_file: std::path::PathBuf,
    cert_pem: String,
    key_pem: String,
    _dir: tempfile::TempDir,
}

impl Pki {
    /// A fresh CA (ECDSA P-256) and a leaf for `localhost` and 127.0.0.1 signed by it.
    fn new() -> Pki {
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "chime grpc_tls test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().expect("a CA key");
        let ca_cert = ca.self_signed(&ca_key).expect("a self-signed CA");
        let issuer = Issuer::new(ca, ca_key);

        let mut leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".into()])
            .expect("leaf params");
        leaf.is_ca = IsCa::ExplicitNoCa;
        leaf.distinguished_name
            .push(DnType::CommonName, "localhost");
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("a server key");
        let cert = leaf.signed_by(&key, &issuer).expect("a CA-signed leaf");

        let dir = tempfile::tempdir().expect("create a tempdir");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).expect("write ca.pem");
        Pki {
            ca_file,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            _dir: dir,
        }
    }

    fn ca_file(&self) -> &str {
        self.ca_file.to_str().expect("a UTF-8 tempdir path")
    }
}

fn grpc_job(target: &str, max_attempts: u32) -> Value {
    json!({
        // Fired by trigger only: a far-future one-shot never fires on its own during a test.
        "schedule": "@at 2099-01-01T00:00:00Z",
        "callback": {"grpc": {"target": target, "timeout_ms": 5000}},
        "payload": {"tls": true},
        "retry": {"max_attempts": max_attempts, "initial_backoff_ms": 100, "max_backoff_ms": 200}
    })
}

/// Triggers `id` and waits until its execution is no longer pending.
async fn trigger_and_settle(node: &Chime, id: &str) -> Value {
    let t = node.post(&format!("/v1/jobs/{id}/trigger"), None).await;
    assert_eq!(t.status, 202, "{t}");
    let exec_id: i64 = t.json["execution_id"].as_str().unwrap().parse().unwrap();
    wait_for(Duration::from_secs(30), async || {
        node.execution(id, exec_id)
            .await
            .filter(|e| e["status"] != "pending")
    })
    .await
    .unwrap_or_else(|| panic!("execution {exec_id} of {id} settles"))
}

/// A chime whose only trusted roots are the test CA's (`SSL_CERT_DIR` would add more).
async fn chime_trusting(db: &Db, pki: &Pki) -> Chime {
    Chime::start_with_env(
        db,
        "n1",
        &[],
        &[
            ("SSL_CERT_FILE", Some(pki.ca_file())),
            ("SSL_CERT_DIR", None),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fire_reaches_a_tls_receiver_whose_ca_is_trusted() {
    let pki = Pki::new();
    let rx =
        GrpcReceiver::start_tls(GrpcScript::always(Code::Ok), &pki.cert_pem, &pki.key_pem).await;
    let target = rx.target();
    assert_eq!(target, format!("https://localhost:{}", rx.port()));
    let db = fresh_sqlite();
    let node = chime_trusting(&db, &pki).await;

    let r = node.put("/v1/jobs/tls-fire", &grpc_job(&target, 1)).await;
    assert_eq!(r.status, 201, "{r}");
    let e = trigger_and_settle(&node, "tls-fire").await;
    assert_eq!(e["status"], "succeeded", "{e}");
    assert_eq!(e["attempts"], 1, "{e}");
    let got = rx.requests();
    assert_eq!(got.len(), 1, "{got:?}");
    let exec_id: i64 = e["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(got[0].req.job_id, "tls-fire");
    assert_eq!(got[0].req.attempt, 1);
    assert_eq!(got[0].req.scheduled_at_ms, exec_id);
    assert_eq!(got[0].req.idempotency_key, format!("tls-fire@{exec_id}"));
    let payload: Value = serde_json::from_str(&got[0].req.payload_json).unwrap();
    assert_eq!(payload, json!({"tls": true}));

    // A second fire goes over the same TLS channel.
    let e = trigger_and_settle(&node, "tls-fire").await;
    assert_eq!(e["status"], "succeeded", "{e}");
    assert_eq!(rx.count(), 2);

    // An IP-literal target is checked against the certificate's IP address name.
    let by_ip = format!("https://127.0.0.1:{}", rx.port());
    let r = node.put("/v1/jobs/tls-ip", &grpc_job(&by_ip, 1)).await;
    assert_eq!(r.status, 201, "{r}");
    let e = trigger_and_settle(&node, "tls-ip").await;
    assert_eq!(e["status"], "succeeded", "{e}");
    let got = rx.requests();
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[2].req.job_id, "tls-ip");
    assert_eq!(got[2].req.attempt, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_from_an_untrusted_ca_is_refused_and_nothing_arrives() {
    let pki = Pki::new();
    let rx =
        GrpcReceiver::start_tls(GrpcScript::always(Code::Ok), &pki.cert_pem, &pki.key_pem).await;
    let db = fresh_sqlite();
    // Only the system's roots: nothing the test's own environment names may leak in.
    let node = Chime::start_with_env(
        &db,
        "n1",
        &[],
        &[("SSL_CERT_FILE", None), ("SSL_CERT_DIR", None)],
    )
    .await;

    let r = node
        .put("/v1/jobs/untrusted", &grpc_job(&rx.target(), 1))
        .await;
    assert_eq!(r.status, 201, "{r}");
    let e = trigger_and_settle(&node, "untrusted").await;
    assert_eq!(e["status"], "failed", "{e}");
    assert_eq!(e["attempts"], 1, "{e}");
    // Today: "gave up after 1 attempts: cannot connect: invalid peer certificate:
    // UnknownIssuer".
    let last_error = e["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.contains("cannot connect") && last_error.contains("certificate"),
        "last_error names the TLS failure: {e}"
    );
    assert_eq!(rx.count(), 0, "nothing crosses an untrusted TLS connection");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_text_target_on_a_tls_port_fails() {
    let pki = Pki::new();
    let rx =
        GrpcReceiver::start_tls(GrpcScript::always(Code::Ok), &pki.cert_pem, &pki.key_pem).await;
    let db = fresh_sqlite();
    // Trusting the CA, so the scheme alone is what is wrong.
    let node = chime_trusting(&db, &pki).await;

    let plain = format!("http://127.0.0.1:{}", rx.port());
    let r = node.put("/v1/jobs/plain", &grpc_job(&plain, 1)).await;
    assert_eq!(r.status, 201, "{r}");
    let e = trigger_and_settle(&node, "plain").await;
    assert_eq!(e["status"], "failed", "{e}");
    assert_eq!(e["attempts"], 1, "{e}");
    // Today: "not retried: gRPC Internal: h2 protocol error: http2 error" (the server drops
    // the connection when the client's HTTP/2 preface is not a TLS ClientHello).
    assert!(
        e["last_error"].as_str().is_some_and(|m| !m.is_empty()),
        "{e}"
    );
    assert_eq!(rx.count(), 0);
}
