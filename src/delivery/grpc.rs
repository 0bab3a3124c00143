//! One gRPC callback attempt: `chime.v1.CallbackService/Fire`, over one HTTP/2 channel per
//! destination that every fire to it shares.
//!
//! The channel connects through [`outbound::resolve`], so gRPC targets obey the same
//! outbound policy as HTTP ones; `https` targets use TLS with the system's root
//! certificates (`SSL_CERT_FILE` / `SSL_CERT_DIR` are honoured).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::OutboundPolicy;
use super::error::AttemptError;
use super::http::Attempt;
use super::outbound::{self, BoxError, Refused};
use crate::pb::FireRequest;
use crate::pb::callback_service_client::CallbackServiceClient;

/// Channels unused this long are dropped (their targets may be gone for good).
const IDLE_CHANNEL: Duration = Duration::from_secs(600);
/// Bytes of a status message kept for `last_error`.
const MAX_MESSAGE: usize = 512;

/// The channels by origin (`http://host:port`); cheap to clone.
#[derive(Clone)]
pub(crate) struct GrpcClients {
    outbound: OutboundPolicy,
    channels: Arc<Mutex<HashMap<String, (Channel, Instant)>>>,
}

impl GrpcClients {
    pub fn new(outbound: OutboundPolicy) -> GrpcClients {
        GrpcClients {
            outbound,
            channels: Arc::default(),
        }
    }

    fn channel(&self, origin: &str) -> Result<Channel, AttemptError> {
        let now = Instant::now();
        let mut channels = self.channels.lock().expect("channels lock");
        if let Some((ch, used)) = channels.get_mut(origin) {
            *used = now;
            return Ok(ch.clone());
        }
        channels.retain(|_, (_, used)| now.duration_since(*used) < IDLE_CHANNEL);
        let bad = |e: tonic::transport::Error| {
            AttemptError::Refused(format!("bad gRPC target {origin}: {e}"))
        };
        let mut endpoint = Endpoint::from_shared(origin.to_string())
            .map_err(bad)?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .user_agent(concat!("chime/", env!("CARGO_PKG_VERSION")))
            .map_err(bad)?;
        if origin.starts_with("https://") {
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().with_native_roots())
                .map_err(bad)?;
        }
        let policy = self.outbound.clone();
        let tls = origin.starts_with("https://");
        let connector = tower::service_fn(move |uri: http::Uri| {
            let policy = policy.clone();
            async move { connect(&policy, &uri, tls).await }
        });
        let channel = endpoint.connect_with_connector_lazy(connector);
        channels.insert(origin.to_string(), (channel.clone(), now));
        Ok(channel)
    }

    /// Sends one attempt to `origin` (`http(s)://host:port`).
    pub async fn send(
        &self,
        origin: &str,
        timeout_ms: u64,
        a: &Attempt<'_>,
    ) -> Result<(), AttemptError> {
        let channel = self.channel(origin)?;
        let mut client = CallbackServiceClient::new(channel);
        let mut req = tonic::Request::new(FireRequest {
            job_id: a.job_id.to_string(),
            scheduled_at_ms: a.scheduled_at,
            fired_at_ms: a.fired_at,
            attempt: a.attempt,
            payload_json: a.payload.get().to_string(),
            idempotency_key: format!("{}@{}", a.job_id, a.scheduled_at),
        });
        let timeout = Duration::from_millis(timeout_ms);
        // Sent as `grpc-timeout`, so the receiver knows the deadline too.
        req.set_timeout(timeout);
        match tokio::time::timeout(timeout, client.fire(req)).await {
            Err(_) => Err(AttemptError::Timeout(timeout_ms)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(classify(status, timeout_ms)),
        }
    }
}

/// Resolves and connects through the outbound policy, trying each allowed address.
async fn connect(
    policy: &OutboundPolicy,
    uri: &http::Uri,
    tls: bool,
) -> Result<TokioIo<tokio::net::TcpStream>, BoxError> {
    let host = uri
        .host()
        .ok_or("the target has no host")?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let mut last: Option<std::io::Error> = None;
    for addr in outbound::resolve(policy, host, port).await? {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok(TokioIo::new(stream));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(Box::new(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
    })))
}

/// Maps a status to an attempt error; tonic reports its own failures as statuses too, so the
/// source chain tells a refused destination, a client-side deadline and a failed connect
/// apart from a receiver's answer.
fn classify(status: tonic::Status, timeout_ms: u64) -> AttemptError {
    let mut source = std::error::Error::source(&status);
    // A status the receiver sent has no source; one with a source was made by tonic from a
    // local transport failure (connect, TLS, h2 protocol, reset), not an answer.
    let local = source.is_some();
    let mut connect = false;
    while let Some(s) = source {
        if let Some(refused) = s.downcast_ref::<Refused>() {
            return AttemptError::Refused(refused.to_string());
        }
        if s.is::<tonic::TimeoutExpired>() {
            return AttemptError::Timeout(timeout_ms);
        }
        connect |= s.is::<tonic::ConnectError>();
        source = s.source();
    }
    let message: String = status
        .message()
        .chars()
        .take(MAX_MESSAGE)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if connect {
        return AttemptError::Connect(format!("cannot connect: {}", message.trim()));
    }
    if local {
        return AttemptError::Transport(format!(
            "gRPC transport failed ({:?}): {}",
            status.code(),
            message.trim()
        ));
    }
    AttemptError::Grpc {
        code: status.code(),
        message: message.trim().to_string(),
    }
}
