//! Who a call is: the tenant from its API key, and the credentials that stay at the
//! gateway. Sits at the start of the request path (admission), before the rate limits.
//!
//! Keys are compared as SHA-256 digests, in constant time, against every configured
//! key (a lookup by key would tell a timing observer how much of a guess was right).
//! The config may hold the digest itself (`"sha256:HEX" = "team-a"`), so the file need
//! hold no secret. Once any key is configured the gateway trusts keys only: an unknown
//! key is refused, the tenant header counts only with `trust_header`, and a call with
//! no key is `anonymous` (or refused under `require_api_key`). Messages name the header
//! expected and never echo a key.
//!
//! What reaches the backend: never the caller's `authorization`, `x-api-key` or tenant
//! header; always the tenant the gateway resolved, in `infergate-tenant`, which callers
//! cannot set (a caller's own is removed first).

use crate::config::TenantConfig;
use http::header::{HeaderName, AUTHORIZATION};
use http::{HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};
use tonic::Status;

/// The header in which the backend receives the resolved tenant.
pub const TENANT_HEADER_OUT: HeaderName = HeaderName::from_static("infergate-tenant");

/// The header in which the inference port's connection layer passes on the identity
/// of the client's certificate (it removes any a caller sent first).
pub const IDENTITY_HEADER: HeaderName = HeaderName::from_static("infergate-peer-identity");

/// The other header an API key may come in.
const API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The tenant of calls that carry no key (or no tenant at all).
pub const ANONYMOUS: &str = "anonymous";

/// The configured API keys, as digests.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: Vec<([u8; 32], String)>,
    /// The tenant header, parsed once (header names are looked up on every call); a
    /// name that is no valid header name can never be sent, so it is `None`.
    header: Option<HeaderName>,
    require: bool,
    trust_header: bool,
    identities: std::collections::BTreeMap<String, String>,
}

impl ApiKeys {
    /// The keys of `[tenants]`; an entry `sha256:HEX` is taken as the key's digest.
    pub fn new(cfg: &TenantConfig) -> Result<ApiKeys, String> {
        let mut keys = Vec::with_capacity(cfg.api_keys.len());
        for (key, tenant) in &cfg.api_keys {
            let digest = match key.strip_prefix("sha256:") {
                Some(hex) => parse_digest(hex).ok_or_else(|| {
                    "tenants.api_keys: a `sha256:` key must be 64 hex digits".to_owned()
                })?,
                None => Sha256::digest(key.as_bytes()).into(),
            };
            keys.push((digest, tenant.clone()));
        }
        Ok(ApiKeys {
            keys,
            header: HeaderName::try_from(cfg.header.as_str()).ok(),
            require: cfg.require_api_key,
            trust_header: cfg.trust_header,
            identities: cfg.identities.clone(),
        })
    }

    /// The tenant of a call with these headers, or why it is refused.
    pub fn tenant(&self, headers: &HeaderMap) -> Result<String, Status> {
        // A client certificate names the tenant, whatever the headers say.
        if let Some(id) = headers.get(IDENTITY_HEADER).and_then(|v| v.to_str().ok()) {
            return Ok(self
                .identities
                .get(id)
                .cloned()
                .unwrap_or_else(|| id.to_owned()));
        }
        let value = |name: &HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        let presented = value(&AUTHORIZATION)
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .or_else(|| value(&API_KEY));
        let from_header = || self.header.as_ref().and_then(value).map(str::to_owned);
        if self.keys.is_empty() && !self.require {
            // No keys configured: the tenant header is the only word on it.
            return Ok(from_header().unwrap_or_else(|| ANONYMOUS.to_owned()));
        }
        match presented {
            Some(key) => self.lookup(key).map(str::to_owned).ok_or_else(|| {
                Status::unauthenticated(
                    "the API key is not known (sent in `authorization: Bearer` or `x-api-key`)",
                )
            }),
            None if self.require => Err(Status::unauthenticated(
                "an API key is required: send `authorization: Bearer KEY` or `x-api-key: KEY`",
            )),
            None if self.trust_header => Ok(from_header().unwrap_or_else(|| ANONYMOUS.to_owned())),
            None => Ok(ANONYMOUS.to_owned()),
        }
    }

    /// The tenant of `key`, comparing its digest with every configured one (no early
    /// exit).
    fn lookup(&self, key: &str) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = None;
        for (candidate, tenant) in &self.keys {
            if same_digest(candidate, &digest) {
                found = Some(tenant.as_str());
            }
        }
        found
    }

    /// Whether the caller's header `name` stays at the gateway: its credentials, its
    /// tenant header, and the headers only the gateway sets.
    pub fn stays_here(&self, name: &HeaderName) -> bool {
        [AUTHORIZATION, API_KEY, TENANT_HEADER_OUT, IDENTITY_HEADER].contains(name)
            || self.header.as_ref() == Some(name)
    }

    /// The metadata to send on, in one pass over the caller's `src`: without the
    /// headers that [stay here](Self::stays_here) or that `also_drop` names (the
    /// connection's own), with the resolved `tenant`, when there is one, in
    /// [`TENANT_HEADER_OUT`].
    pub fn outgoing(
        &self,
        src: &HeaderMap,
        tenant: Option<&str>,
        also_drop: impl Fn(&HeaderName) -> bool,
    ) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(src.len() + 1);
        for (name, value) in src {
            if !also_drop(name) && !self.stays_here(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        if let Some(value) = tenant.and_then(|t| HeaderValue::from_str(t).ok()) {
            headers.insert(TENANT_HEADER_OUT, value);
        }
        headers
    }
}

/// Two digests compared without a data-dependent branch.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Whether two secrets are equal, compared as SHA-256 digests, so neither the length
/// nor where a guess first differs shows in the time taken.
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    same_digest(&Sha256::digest(a).into(), &Sha256::digest(b).into())
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(require: bool, trust: bool) -> ApiKeys {
        let mut cfg = TenantConfig::default();
        cfg.api_keys.insert("key-a".into(), "team-a".into());
        // sha256("key-b")
        let hashed = format!("sha256:{:x}", Sha256::digest(b"key-b"));
        cfg.api_keys.insert(hashed, "team-b".into());
        cfg.require_api_key = require;
        cfg.trust_header = trust;
        ApiKeys::new(&cfg).expect("keys")
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("ascii"));
        }
        h
    }

    #[test]
    fn keys_name_tenants_and_unknown_keys_are_refused() {
        let k = keys(false, false);
        let t = |h: &[(&'static str, &str)]| k.tenant(&headers(h));
        assert_eq!(
            t(&[("authorization", "Bearer key-a")]).expect("a"),
            "team-a"
        );
        assert_eq!(t(&[("x-api-key", "key-b")]).expect("hashed b"), "team-b");
        let refused = t(&[("authorization", "Bearer nope")]).expect_err("unknown");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert!(!refused.message().contains("nope"), "never echoes a key");
        // The header cannot claim a tenant once keys are configured.
        assert_eq!(
            t(&[("x-infergate-tenant", "team-a")]).expect("anonymous"),
            ANONYMOUS
        );
        let trusting = keys(false, true);
        assert_eq!(
            trusting
                .tenant(&headers(&[("x-infergate-tenant", "team-a")]))
                .expect("trusted"),
            "team-a"
        );
        let strict = keys(true, false);
        let refused = strict.tenant(&headers(&[])).expect_err("required");
        assert!(
            refused.message().contains("authorization: Bearer"),
            "{refused:?}"
        );
    }

    #[test]
    fn credentials_stay_and_the_resolved_tenant_goes_on() {
        let k = keys(false, false);
        let src = headers(&[
            ("authorization", "Bearer key-a"),
            ("x-api-key", "key-a"),
            ("x-infergate-tenant", "someone-else"),
            ("infergate-tenant", "forged"),
            ("x-request-id", "r-1"),
            ("connection", "close"),
        ]);
        let h = k.outgoing(&src, Some("team-a"), |name| name == "connection");
        assert!(h.get("connection").is_none());
        assert!(h.get("authorization").is_none() && h.get("x-api-key").is_none());
        assert!(h.get("x-infergate-tenant").is_none());
        assert_eq!(
            h.get(TENANT_HEADER_OUT).map(|v| v.as_bytes()),
            Some(&b"team-a"[..])
        );
        assert_eq!(
            h.get("x-request-id").map(|v| v.as_bytes()),
            Some(&b"r-1"[..])
        );
    }

    #[test]
    fn a_client_certificate_names_the_tenant_over_keys_and_headers() {
        let mut cfg = TenantConfig::default();
        cfg.identities
            .insert("spiffe://example.org/a".into(), "team-a".into());
        cfg.api_keys.insert("key-b".into(), "team-b".into());
        cfg.require_api_key = true;
        let k = ApiKeys::new(&cfg).expect("keys");
        let t = |h: &[(&'static str, &str)]| k.tenant(&headers(h)).expect("tenant");
        assert_eq!(
            t(&[
                ("infergate-peer-identity", "spiffe://example.org/a"),
                ("x-infergate-tenant", "team-b"),
                ("authorization", "Bearer key-b"),
            ]),
            "team-a"
        );
        // An identity not in the map is its own tenant.
        assert_eq!(
            t(&[("infergate-peer-identity", "client.example")]),
            "client.example"
        );
        // It never reaches the backend.
        let src = headers(&[("infergate-peer-identity", "client.example")]);
        let h = k.outgoing(&src, None, |_| false);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn a_bad_digest_is_a_config_error() {
        let mut cfg = TenantConfig::default();
        cfg.api_keys.insert("sha256:abc".into(), "t".into());
        assert!(ApiKeys::new(&cfg).expect_err("short").contains("64 hex"));
    }
}
