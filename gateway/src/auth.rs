//! API keys, scopes and per-key limits.
//!
//! Keys are random tokens (`atl_…`) that the gateway never stores: it is configured with their
//! SHA-256 (`atelier keygen` prints both). A request carries `Authorization: Bearer <key>`; no key
//! → 401, a key without the route's scope → 403. Each key has a token-bucket rate limit and a limit
//! on requests in flight → 429 with `Retry-After`.
//!
//! Key entries (`--api-key` / `ATELIER_API_KEYS`, comma-separated): `NAME:SHA256HEX:SCOPE+SCOPE`,
//! scopes from [`Scope`] or `*` for all.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    JobsRead,
    JobsWrite,
    ArtifactsRead,
    ArtifactsWrite,
    /// Lists and cancels every key's jobs (others see and cancel only their own).
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Scope::JobsRead,
        Scope::JobsWrite,
        Scope::ArtifactsRead,
        Scope::ArtifactsWrite,
        Scope::Admin,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Scope::JobsRead => "jobs:read",
            Scope::JobsWrite => "jobs:write",
            Scope::ArtifactsRead => "artifacts:read",
            Scope::ArtifactsWrite => "artifacts:write",
            Scope::Admin => "admin",
        }
    }
    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.name() == s)
    }
}

/// One configured key.
#[derive(Debug, Clone)]
pub struct KeyEntry {
    pub name: String,
    pub sha256: [u8; 32],
    pub scopes: Vec<Scope>,
}

impl KeyEntry {
    /// Parses `NAME:SHA256HEX:SCOPE+SCOPE`.
    pub fn parse(entry: &str) -> Result<Self, String> {
        let entry = entry.trim();
        let mut it = entry.splitn(3, ':');
        let (Some(name), Some(hash), Some(scopes)) = (it.next(), it.next(), it.next()) else {
            return Err(format!(
                "API key entry {entry:?} must be NAME:SHA256HEX:SCOPES (see `atelier keygen`)"
            ));
        };
        if name.is_empty() {
            return Err(format!("API key entry {entry:?} has an empty name"));
        }
        let bytes = hex::decode(hash).ok().filter(|b| b.len() == 32).ok_or_else(|| {
            format!("API key {name:?}: {hash:?} is not a 64-character hex SHA-256 (configure the hash, not the key)")
        })?;
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&bytes);
        let scopes = if scopes == "*" {
            Scope::ALL.to_vec()
        } else {
            scopes
                .split('+')
                .map(|s| {
                    Scope::parse(s).ok_or_else(|| {
                        format!(
                            "API key {name:?}: unknown scope {s:?}; known: {}, *",
                            Scope::ALL.map(Scope::name).join(", ")
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        Ok(Self {
            name: name.to_owned(),
            sha256,
            scopes,
        })
    }
}

/// A new random key and its config entry.
pub fn generate_key(name: &str, scopes: &str) -> Result<(String, String), String> {
    let mut raw = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut raw);
    let key = format!("atl_{}", hex::encode(raw));
    let entry = format!(
        "{name}:{}:{scopes}",
        hex::encode(Sha256::digest(key.as_bytes()))
    );
    KeyEntry::parse(&entry)?;
    Ok((key, entry))
}

/// Who is calling, as established by the middleware (an extension on every authenticated request).
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    scopes: Vec<Scope>,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.scopes.contains(&Scope::Admin)
    }

    /// Whether this caller may see and cancel `record` in listings: its submitter, or an admin.
    pub fn owns(&self, record: &atelier_contracts::JobRecord) -> bool {
        self.is_admin() || record.submitted_by.as_deref() == Some(self.name.as_str())
    }

    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.scopes.contains(&scope) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "API key {:?} lacks the scope {:?} this route needs",
                    self.name,
                    scope.name()
                ),
            ))
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sustained requests per second per key.
    pub rate: f64,
    /// Requests a key may make at once above the sustained rate.
    pub burst: f64,
    /// Requests in flight per key.
    pub concurrency: usize,
}

struct Bucket {
    tokens: f64,
    at: Instant,
    in_flight: Arc<Semaphore>,
}

pub struct Auth {
    /// sha256(key) → entry; `None` means auth is off (`--insecure-no-auth`).
    keys: Option<HashMap<[u8; 32], KeyEntry>>,
    limits: Limits,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Auth {
    /// Builds the key table. Refuses to run without keys unless `insecure` is set, and refuses
    /// `insecure` on a non-loopback address.
    pub fn new(
        entries: &[String],
        insecure: bool,
        addr: SocketAddr,
        limits: Limits,
    ) -> Result<Self, String> {
        let keys = if insecure {
            if !addr.ip().is_loopback() {
                return Err(format!(
                    "--insecure-no-auth is only allowed on loopback addresses, not {addr}; configure API keys (`atelier keygen`)"
                ));
            }
            tracing::warn!("authentication is OFF (--insecure-no-auth): any local process can use this gateway");
            None
        } else {
            let mut map = HashMap::new();
            for e in entries.iter().filter(|e| !e.trim().is_empty()) {
                let k = KeyEntry::parse(e)?;
                map.insert(k.sha256, k);
            }
            if map.is_empty() {
                return Err(
                    "no API keys configured: create one with `atelier keygen --name me` and pass it with --api-key / ATELIER_API_KEYS, or run locally with --insecure-no-auth".into(),
                );
            }
            Some(map)
        };
        Ok(Self {
            keys,
            limits,
            buckets: Mutex::new(HashMap::new()),
        })
    }

    fn identify(&self, req: &Request) -> Result<Caller, ApiError> {
        let Some(keys) = &self.keys else {
            return Ok(Caller {
                name: "anonymous".into(),
                scopes: Scope::ALL.to_vec(),
            });
        };
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("missing API key: send `Authorization: Bearer <key>`"))?;
        let value = header
            .to_str()
            .map_err(|_| unauthorized("Authorization header is not ASCII"))?;
        // Bearer, or HTTP Basic with the key as the password (A1111 clients' `--api-auth`).
        let basic;
        let token = if let Some(b) = value.strip_prefix("Basic ") {
            use base64::Engine as _;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
                .ok_or_else(|| unauthorized("Basic credentials are not base64 of user:key"))?;
            basic = decoded
                .split_once(':')
                .map(|(_, k)| k.to_string())
                .ok_or_else(|| unauthorized("Basic credentials must be user:key"))?;
            basic.as_str()
        } else {
            value
                .strip_prefix("Bearer ")
                .ok_or_else(|| {
                    unauthorized(
                        "Authorization must use the Bearer scheme: `Authorization: Bearer <key>` (or Basic with the key as password)",
                    )
                })?
                .trim()
        };
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // The map lookup is on the digest of the presented key, so its timing reveals nothing
        // about any configured key.
        let entry = keys
            .get(&digest)
            .ok_or_else(|| unauthorized("unknown API key"))?;
        Ok(Caller {
            name: entry.name.clone(),
            scopes: entry.scopes.clone(),
        })
    }

    /// Takes a token from the caller's bucket and a slot from its in-flight limit.
    fn admit(&self, caller: &str) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let b = buckets.entry(caller.to_owned()).or_insert_with(|| Bucket {
            tokens: self.limits.burst,
            at: now,
            in_flight: Arc::new(Semaphore::new(self.limits.concurrency.max(1))),
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.limits.rate)
            .min(self.limits.burst);
        b.at = now;
        if b.tokens < 1.0 {
            let wait = ((1.0 - b.tokens) / self.limits.rate.max(1e-6))
                .ceil()
                .max(1.0) as u64;
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "API key {caller:?} exceeded {} requests/s",
                    self.limits.rate
                ),
            )
            .with_retry_after(wait));
        }
        let permit = b.in_flight.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_in_flight",
                format!(
                    "API key {caller:?} already has {} requests in flight",
                    self.limits.concurrency
                ),
            )
            .with_retry_after(1)
        })?;
        b.tokens -= 1.0;
        Ok(permit)
    }
}

/// Middleware on every `/v1` route: identify, limit, then run the handler with a [`Caller`].
pub async fn middleware(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    let caller = match auth.identify(&req) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let permit = match auth.admit(&caller.name) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    req.extensions_mut().insert(caller);
    let resp = next.run(req).await;
    hold_while_streaming(resp, permit)
}

/// A response whose length is unknown (an event stream, a streamed download) keeps the key's
/// in-flight slot until its body ends or the client goes away; others give it back now.
fn hold_while_streaming(resp: Response, permit: tokio::sync::OwnedSemaphorePermit) -> Response {
    use axum::body::{Body, HttpBody as _};
    if resp.body().size_hint().exact().is_some() {
        return resp;
    }
    resp.map(|body| {
        let stream = futures::StreamExt::map(body.into_data_stream(), move |chunk| {
            let _held = &permit;
            chunk
        });
        Body::from_stream(stream)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> SocketAddr {
        "127.0.0.1:7860".parse().unwrap()
    }
    const LIMITS: Limits = Limits {
        rate: 1.0,
        burst: 2.0,
        concurrency: 1,
    };

    #[test]
    fn generated_keys_parse_and_authenticate() {
        let (key, entry) = generate_key("ci", "jobs:read+jobs:write").unwrap();
        let auth = Auth::new(&[entry], false, local(), LIMITS).unwrap();
        let req = Request::builder()
            .header("authorization", format!("Bearer {key}"))
            .body(axum::body::Body::empty())
            .unwrap();
        let caller = auth.identify(&req).unwrap();
        assert_eq!(caller.name, "ci");
        assert!(caller.require(Scope::JobsWrite).is_ok());
        assert_eq!(
            caller.require(Scope::ArtifactsWrite).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        let bad = Request::builder()
            .header("authorization", "Bearer nope")
            .body(axum::body::Body::empty())
            .unwrap();
        assert_eq!(
            auth.identify(&bad).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn config_errors_say_the_fix() {
        assert!(KeyEntry::parse("x:abc:*").unwrap_err().contains("SHA-256"));
        assert!(KeyEntry::parse(&format!("x:{}:root", "0".repeat(64)))
            .unwrap_err()
            .contains("unknown scope"));
        assert!(Auth::new(&[], false, local(), LIMITS)
            .err()
            .unwrap()
            .contains("atelier keygen"));
        let public: SocketAddr = "0.0.0.0:7860".parse().unwrap();
        assert!(Auth::new(&[], true, public, LIMITS)
            .err()
            .unwrap()
            .contains("loopback"));
    }

    #[test]
    fn rate_and_concurrency_limits() {
        let auth = Auth::new(&[], true, local(), LIMITS).unwrap();
        let p1 = auth.admit("k").unwrap();
        let e = auth.admit("k").unwrap_err();
        assert_eq!(e.code, "too_many_in_flight");
        drop(p1);
        let _p2 = auth.admit("k").unwrap();
        drop(_p2);
        let e = auth.admit("k").unwrap_err();
        assert_eq!(e.code, "rate_limited");
        assert!(e.retry_after.unwrap() >= 1);
    }
}
