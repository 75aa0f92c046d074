//! Outbound HTTP for pushes (webhooks, EWS push): refuses private, loopback and link-local
//! destinations, after DNS resolution too, unless the operator allows them; never follows
//! redirects (a redirect is a failed delivery, so it cannot lead anywhere refused).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Sends one push request and says how it went, as the delivery layer's push driver reads
/// it: a 2xx with its body, 410 Gone, or a failure with its root cause (and the endpoint's
/// `Retry-After`, if it gave one).
pub async fn attempt(request: reqwest::RequestBuilder) -> herald_delivery::Attempt<bytes::Bytes> {
    use herald_delivery::Attempt;
    match request.send().await {
        Ok(r) if r.status().is_success() => Attempt::Delivered(r.bytes().await.unwrap_or_default()),
        Ok(r) if r.status() == reqwest::StatusCode::GONE => {
            Attempt::Gone("the endpoint answered 410 Gone".into())
        }
        Ok(r) => Attempt::Failed {
            error: format!("the endpoint answered {}", r.status()),
            retry_after: r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs),
        },
        Err(e) => Attempt::Failed {
            error: describe(&e),
            retry_after: None,
        },
    }
}

/// An outbound error with its root cause (refused address, connection refused, timeout).
pub fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".to_owned();
    }
    let mut source: &dyn std::error::Error = e;
    while let Some(s) = source.source() {
        source = s;
    }
    format!("{e}: {source}")
}

/// Which destinations outbound requests may reach.
#[derive(Clone, Debug, Default)]
pub struct EgressPolicy {
    /// Loopback destinations are allowed (the zero-config default while Herald itself listens
    /// only on loopback).
    pub allow_loopback: bool,
    /// Networks allowed even though they are private, loopback or link-local.
    pub allowed: Vec<IpNet>,
}

/// Why an address is not a public one, if it is not.
pub fn special_range(ip: IpAddr) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 @ IpAddr::V4(_) => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.is_unspecified() || o[0] == 0 {
                Some("unspecified")
            } else if v4.is_broadcast() || v4.is_multicast() {
                Some("broadcast or multicast")
            } else if o[0] == 100 && (o[1] & 0xC0) == 64 {
                Some("shared address space (CGNAT)")
            } else if o[0] >= 240 {
                Some("reserved")
            } else if matches!(o, [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _]) {
                Some("documentation (TEST-NET)")
            } else if o[0] == 198 && (o[1] & 0xFE) == 18 {
                Some("benchmarking")
            } else if matches!(o, [192, 0, 0, _]) {
                Some("IETF protocol assignment")
            } else if o[3] == 255 {
                // A directed broadcast in any subnet of /24 or longer (and the top address of
                // larger ones): refused, since Herald cannot know the subnet's mask.
                Some("directed broadcast")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if (seg[0] & 0xFE00) == 0xFC00 {
                Some("unique local")
            } else if (seg[0] & 0xFFC0) == 0xFE80 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if seg[0] == 0x2001 && seg[1] == 0x0db8 {
                Some("documentation")
            } else if seg[0] == 0x0064 && seg[1] == 0xff9b {
                Some("NAT64 (it would reach IPv4 addresses unchecked)")
            } else {
                None
            }
        }
    }
}

impl EgressPolicy {
    /// Whether `ip` may be reached; if not, why.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        if self.allowed.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        match special_range(ip) {
            None => Ok(()),
            Some("loopback") if self.allow_loopback => Ok(()),
            Some(why) => Err(format!(
                "{ip} is a {why} address; list it in webhooks.allowed_networks to allow it"
            )),
        }
    }

    /// Checks a destination URL before any request: scheme, host, and the address when the
    /// host is a literal one (names are checked after resolution).
    pub fn check_url(&self, url: &str) -> Result<reqwest::Url, String> {
        let u = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err("only http and https URLs can be called".into());
        }
        match u.host() {
            None => return Err("the URL has no host".into()),
            Some(url::Host::Ipv4(ip)) => self.check(IpAddr::V4(ip))?,
            Some(url::Host::Ipv6(ip)) => self.check(IpAddr::V6(ip))?,
            Some(url::Host::Domain(_)) => {}
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Err("credentials in the URL are not allowed".into());
        }
        Ok(u)
    }

    /// An HTTP client that applies this policy to every address it connects to.
    pub fn client(&self, timeout: Duration) -> reqwest::Client {
        reqwest::Client::builder()
            .dns_resolver(Arc::new(CheckedResolver(self.clone())))
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "outbound client setup failed; using defaults");
                reqwest::Client::new()
            })
    }
}

/// Resolves names, then drops every address the policy refuses.
struct CheckedResolver(EgressPolicy);

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match policy.check(a.ip()) {
                    Ok(()) => true,
                    Err(e) => {
                        refused = Some(e);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let why = refused.unwrap_or_else(|| "no address".into());
                return Err(format!("{host} resolves only to refused addresses: {why}").into());
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_ranges_are_refused_and_public_ones_allowed() {
        let p = EgressPolicy::default();
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "224.0.0.1",
            "192.0.2.7",
            "198.51.100.1",
            "203.0.113.9",
            "198.18.0.1",
            "198.19.255.1",
            "192.0.0.8",
            "93.184.216.255",
            "255.255.255.255",
            "2001:db8::1",
            "64:ff9b::7f00:1",
        ] {
            assert!(p.check(bad.parse().unwrap()).is_err(), "{bad} allowed");
        }
        for good in ["93.184.216.34", "2606:4700::1111", "8.8.8.8"] {
            assert!(p.check(good.parse().unwrap()).is_ok(), "{good} refused");
        }
    }

    #[test]
    fn loopback_and_listed_networks_can_be_allowed() {
        let p = EgressPolicy {
            allow_loopback: true,
            allowed: vec!["10.0.0.0/8".parse().unwrap()],
        };
        assert!(p.check("127.0.0.1".parse().unwrap()).is_ok());
        assert!(p.check("10.9.9.9".parse().unwrap()).is_ok());
        assert!(p.check("192.168.0.1".parse().unwrap()).is_err());
    }

    #[test]
    fn urls_are_checked_before_any_request() {
        let p = EgressPolicy::default();
        assert!(p.check_url("http://127.0.0.1:9/x").is_err());
        assert!(p.check_url("http://[::1]/x").is_err());
        assert!(p.check_url("ftp://example.com/").is_err());
        assert!(p.check_url("https://user:pw@example.com/").is_err());
        assert!(p.check_url("not a url").is_err());
        assert!(p.check_url("https://example.com/hook").is_ok());
    }
}
