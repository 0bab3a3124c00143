//! Which addresses callbacks may reach.
//!
//! A job's callback URL is chosen by whoever can call the API, so an unchecked URL lets
//! them make chime fetch cloud metadata (169.254.169.254 and friends) or other link-local
//! services. Such addresses are refused by default; `outbound_allow` re-admits specific
//! networks and `outbound_deny` refuses more. IP literals are checked when a job is
//! written; host names are checked on every connection, after DNS, so a name that later
//! resolves to a refused address is caught too.

use std::net::IpAddr;
use std::sync::Arc;

/// Refused unless allowed: link-local (incl. the AWS/GCP/Azure metadata address) and the
/// metadata addresses that live elsewhere.
const BUILTIN_DENY: &[&str] = &[
    "169.254.0.0/16",
    "fe80::/10",
    "fd00:ec2::254/128",
    "100.100.100.200/32",
];

/// An IP network, `addr/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `10.0.0.0/8`, `fd00::/8`, or a bare address (a /32 or /128).
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let bad = || format!("{text:?} is not an IP address or network such as 10.0.0.0/8");
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4-mapped IPv6 address is the IPv4 address it maps.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The outbound address policy; cheap to clone.
#[derive(Debug, Clone)]
pub struct OutboundPolicy {
    inner: Arc<(Vec<Cidr>, Vec<Cidr>)>,
}

impl Default for OutboundPolicy {
    fn default() -> Self {
        OutboundPolicy::new(&[], &[]).expect("the built-in lists parse")
    }
}

impl OutboundPolicy {
    /// `allow` wins over everything; `deny` adds to the built-in list.
    pub fn new(allow: &[String], deny: &[String]) -> Result<OutboundPolicy, String> {
        let allow = allow
            .iter()
            .map(|s| Cidr::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        let deny = BUILTIN_DENY
            .iter()
            .map(|s| Cidr::parse(s))
            .chain(deny.iter().map(|s| Cidr::parse(s)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(OutboundPolicy {
            inner: Arc::new((allow, deny)),
        })
    }

    /// Err says why `ip` may not be called.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        let (allow, deny) = &*self.inner;
        if allow.iter().any(|n| n.contains(ip)) {
            return Ok(());
        }
        match deny.iter().find(|n| n.contains(ip)) {
            Some(net) => Err(format!(
                "address {ip} is in the refused network {}/{} (link-local, cloud metadata, or \
                 outbound_deny); allow it with outbound_allow",
                net.addr, net.prefix
            )),
            None => Ok(()),
        }
    }
}

/// A DNS resolver that drops refused addresses, so a host name cannot smuggle a callback
/// to one. If every address is refused the connection fails with [`Refused`].
pub(crate) struct CheckedResolver {
    pub policy: OutboundPolicy,
}

/// The marker error for a refused destination (never retried).
#[derive(Debug, thiserror::Error)]
#[error("refused: {0}")]
pub(crate) struct Refused(pub String);

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let allowed = resolve(&policy, name.as_str(), 0).await?;
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Resolves `host` and keeps the addresses the policy allows; [`Refused`] if none is left.
/// Both the HTTP client's resolver and the gRPC connector go through here, so a name that
/// resolves to a metadata address is refused whatever the transport.
pub(crate) async fn resolve(
    policy: &OutboundPolicy,
    host: &str,
    port: u16,
) -> Result<Vec<std::net::SocketAddr>, BoxError> {
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    let mut why = None;
    let allowed: Vec<std::net::SocketAddr> = addrs
        .into_iter()
        .filter(|a| match policy.check(a.ip()) {
            Ok(()) => true,
            Err(e) => {
                why = Some(e);
                false
            }
        })
        .collect();
    if allowed.is_empty() {
        let reason = why.unwrap_or_else(|| format!("{host} has no addresses"));
        return Err(Box::new(Refused(format!("{host}: {reason}"))));
    }
    Ok(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn metadata_and_link_local_are_refused_by_default() {
        let p = OutboundPolicy::default();
        for bad in [
            "169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "fd00:ec2::254",
            "100.100.100.200",
            "::ffff:169.254.169.254",
        ] {
            assert!(p.check(ip(bad)).is_err(), "{bad} allowed");
        }
        for good in ["127.0.0.1", "10.1.2.3", "8.8.8.8", "::1", "169.253.255.255"] {
            assert!(p.check(ip(good)).is_ok(), "{good} refused");
        }
    }

    #[test]
    fn allow_overrides_and_deny_adds() {
        let p = OutboundPolicy::new(&["169.254.10.0/24".into()], &["10.0.0.0/8".into()]).unwrap();
        assert!(p.check(ip("169.254.10.7")).is_ok());
        assert!(p.check(ip("169.254.169.254")).is_err());
        let e = p.check(ip("10.9.9.9")).unwrap_err();
        assert!(e.contains("10.0.0.0/8"), "{e}");
        assert!(OutboundPolicy::new(&["nope".into()], &[]).is_err());
        assert!(OutboundPolicy::new(&[], &["10.0.0.0/33".into()]).is_err());
    }

    #[test]
    fn cidr_edges() {
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains(ip("1.2.3.4")));
        assert!(!all.contains(ip("::1")), "families do not mix");
        let one = Cidr::parse("192.0.2.1").unwrap();
        assert!(one.contains(ip("192.0.2.1")) && !one.contains(ip("192.0.2.2")));
    }
}
