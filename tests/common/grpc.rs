//! A real gRPC receiver: a tonic server implementing `chime.v1.CallbackService` from the
//! generated code, recording every `Fire` and answering with a scripted status sequence.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chime::pb::callback_service_server::{CallbackService, CallbackServiceServer};
use chime::pb::{FireRequest, FireResponse};
use tonic::Code;

use super::now_ms;

/// `queue` in order, then `then` forever, each after `delay`.
#[derive(Debug, Clone)]
pub struct GrpcScript {
    queue: VecDeque<Code>,
    then: Code,
    delay: Duration,
}

impl GrpcScript {
    pub fn always(code: Code) -> GrpcScript {
        GrpcScript::first(&[], code)
    }

    pub fn first(codes: &[Code], then: Code) -> GrpcScript {
        GrpcScript {
            queue: codes.iter().copied().collect(),
            then,
            delay: Duration::ZERO,
        }
    }

    pub fn delayed(mut self, delay: Duration) -> GrpcScript {
        self.delay = delay;
        self
    }
}

/// One `Fire` as it arrived.
#[derive(Debug, Clone)]
pub struct GrpcReceived {
    pub at_ms: i64,
    pub req: FireRequest,
    /// The `grpc-timeout` metadata the client sent, if any.
    pub grpc_timeout: Option<String>,
    /// The client's address: the same one for calls over one reused connection.
    pub peer: Option<std::net::SocketAddr>,
    pub answered: Code,
}

struct Shared {
    script: Mutex<GrpcScript>,
    requests: Mutex<Vec<GrpcReceived>>,
}

struct Service(Arc<Shared>);

#[tonic::async_trait]
impl CallbackService for Service {
    async fn fire(
        &self,
        request: tonic::Request<FireRequest>,
    ) -> Result<tonic::Response<FireResponse>, tonic::Status> {
        let at_ms = now_ms();
        let grpc_timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let peer = request.remote_addr();
        let (code, delay) = {
            let mut s = self.0.script.lock().unwrap();
            (s.queue.pop_front().unwrap_or(s.then), s.delay)
        };
        self.0.requests.lock().unwrap().push(GrpcReceived {
            at_ms,
            req: request.into_inner(),
            grpc_timeout,
            peer,
            answered: code,
        });
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if code == Code::Ok {
            Ok(tonic::Response::new(FireResponse {}))
        } else {
            Err(tonic::Status::new(code, format!("scripted {code:?}")))
        }
    }
}

pub struct GrpcReceiver {
    addr: std::net::SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl GrpcReceiver {
    pub async fn start(script: GrpcScript) -> GrpcReceiver {
        GrpcReceiver::spawn(script, None).await
    }

    /// A receiver that speaks only TLS, presenting `cert_pem` (the leaf first, then any
    /// intermediates) with the private key `key_pem`; [`GrpcReceiver::target`] is then
    /// `https://localhost:PORT`, so the certificate must name `localhost`.
    pub async fn start_tls(script: GrpcScript, cert_pem: &str, key_pem: &str) -> GrpcReceiver {
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem));
        GrpcReceiver::spawn(script, Some(tls)).await
    }

    async fn spawn(
        script: GrpcScript,
        tls: Option<tonic::transport::ServerTlsConfig>,
    ) -> GrpcReceiver {
        let shared = Arc::new(Shared {
            script: Mutex::new(script),
            requests: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gRPC receiver");
        let addr = listener.local_addr().expect("receiver address");
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let svc = CallbackServiceServer::new(Service(shared.clone()));
        let is_tls = tls.is_some();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder
                .tls_config(tls)
                .expect("a valid server certificate and key");
        }
        let server = tokio::spawn(async move {
            builder
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await
                .expect("gRPC receiver runs");
        });
        GrpcReceiver {
            addr,
            tls: is_tls,
            shared,
            server,
        }
    }

    /// The `callback.grpc.target` to give a job: `http://127.0.0.1:PORT`, or
    /// `https://localhost:PORT` for a receiver started with [`GrpcReceiver::start_tls`].
    pub fn target(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn set_script(&self, script: GrpcScript) {
        *self.shared.script.lock().unwrap() = script;
    }

    pub fn requests(&self) -> Vec<GrpcReceived> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }
}

impl Drop for GrpcReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}
