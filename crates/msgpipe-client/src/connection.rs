//! Connecting to the broker, and the capped backoff between attempts.
//!
//! Neither the consumer nor the publisher uses lapin's auto-recovery: each runs its own loop
//! (connect, open channels, work until the connection is gone, wait, again). A recovered lapin
//! channel replays the topology it saw, but deliveries in flight at the break carry ackers of the
//! dead channel, and publisher confirms in flight are lost either way; an explicit loop makes
//! "the connection is gone" one visible event that nacks nothing twice and logs once.

use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Once;
use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

/// Capped exponential backoff between reconnect attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Wait after the first failure.
    pub initial: Duration,
    /// Longest wait between attempts.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

/// The waits of one outage: initial, doubled each time up to max, with ±20 % jitter so a fleet
/// of clients does not reconnect in lockstep.
#[derive(Debug)]
pub(crate) struct BackoffState {
    policy: Backoff,
    next: Duration,
}

impl BackoffState {
    pub(crate) fn new(policy: Backoff) -> Self {
        Self {
            policy,
            next: policy.initial,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.policy.initial;
    }

    pub(crate) fn next_wait(&mut self) -> Duration {
        let base = self.next.min(self.policy.max);
        self.next = base.saturating_mul(2).min(self.policy.max);
        let factor = 0.8 + (random_u64() % 401) as f64 / 1000.0;
        base.mul_f64(factor)
    }
}

/// A random number: RandomState is seeded randomly per instance, enough for jitter.
fn random_u64() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// A random wait between zero and `max` (millisecond steps), so that a fleet of clients woken
/// by the same event (a broker back up) does not act in the same instant.
pub(crate) fn jitter(max: Duration) -> Duration {
    let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(random_u64() % max_ms.saturating_add(1))
}

/// The URI is not something lapin can connect to. The text never contains the URI (it holds
/// the password).
#[derive(Debug, thiserror::Error)]
#[error("the AMQP URI is not valid (expected amqp[s]://user:password@host:port/vhost)")]
pub struct InvalidUri;

/// Checks a URI before any connection attempt, so a typo fails fast instead of retrying forever.
pub(crate) fn check_uri(uri: &str) -> Result<(), InvalidUri> {
    AMQPUri::from_str(uri).map(|_| ()).map_err(|_| InvalidUri)
}

/// Environment variable naming a PEM file of CA certificates that the consumer and publisher
/// trust for `amqps` URIs, in addition to the OS trust store; read by
/// [`crate::ConsumerOptions::new`] and [`crate::PublisherOptions::new`].
pub const CA_FILE_ENV: &str = "MSGPIPE_CA_FILE";

/// The CA file named by [`CA_FILE_ENV`], when set and not empty.
pub(crate) fn ca_file_from_env() -> Option<PathBuf> {
    std::env::var_os(CA_FILE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `uri` with the password of its userinfo replaced by `***`, whatever its length (and the
/// rest untouched), for `Debug` output and logs.
pub(crate) fn redact_uri(uri: &str) -> String {
    let authority_start = uri.find("://").map_or(0, |i| i + 3);
    let rest = &uri[authority_start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let Some(at) = authority.rfind('@') else {
        return uri.to_string();
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return uri.to_string();
    };
    let password_start = authority_start + colon + 1;
    let password_end = authority_start + at;
    format!("{}***{}", &uri[..password_start], &uri[password_end..])
}

/// Opens one connection, within `timeout`, trusting the CAs in `ca_file` (PEM) besides the OS
/// store. Errors are described without the URI.
pub(crate) async fn connect(
    uri: &str,
    name: &str,
    timeout: Duration,
    ca_file: Option<&Path>,
) -> Result<Connection, String> {
    install_crypto_provider();
    let cert_chain = match ca_file {
        Some(path) => Some(
            tokio::fs::read_to_string(path)
                .await
                .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain,
    };
    let runtime = lapin::runtime::default_runtime()
        .map_err(|e| format!("cannot start the AMQP runtime: {e}"))?;
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let connect = Connection::connect_with_config(uri, properties, tls, runtime);
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(format!(
            "cannot connect: {}",
            redact_uri(&error.to_string())
        )),
        Err(_) => Err(format!(
            "cannot connect: no answer within {}s",
            timeout.as_secs_f64()
        )),
    }
}

/// rustls needs one process-wide crypto provider; when the application has not chosen one,
/// use ring (the provider lapin is built with here).
fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
    });
}

/// Closes a connection politely if it is still open; errors do not matter any more.
pub(crate) async fn close(connection: &Connection) {
    if connection.status().connected() {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            connection.close(200, "msgpipe client done".into()),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter_and_resets() {
        let mut state = BackoffState::new(Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1_000),
        });
        let waits: Vec<_> = (0..7).map(|_| state.next_wait()).collect();
        for (wait, base) in waits.iter().zip([100, 200, 400, 800, 1_000, 1_000, 1_000]) {
            let ms = wait.as_millis() as u64;
            assert!(
                (base * 8 / 10..=base * 12 / 10).contains(&ms),
                "{ms} vs {base}"
            );
        }
        state.reset();
        assert!(state.next_wait() <= Duration::from_millis(120));
    }

    #[test]
    fn redacted_uris_hide_any_password_and_keep_the_rest() {
        for (uri, shown) in [
            ("amqp://u:p@h:5672/%2f", "amqp://u:***@h:5672/%2f"),
            ("amqps://u:@h/v", "amqps://u:***@h/v"),
            ("amqp://u:p%40ss:w@h", "amqp://u:***@h"),
            ("amqp://user@h/v", "amqp://user@h/v"),
            ("amqp://h:5672/a@b", "amqp://h:5672/a@b"),
            ("u:x@h", "u:***@h"),
        ] {
            assert_eq!(redact_uri(uri), shown);
        }
    }

    #[test]
    fn invalid_uris_are_refused_without_echoing_them() {
        assert!(check_uri("amqp://guest:guest@localhost:5672/%2f").is_ok());
        let error = check_uri("http://user:s3cret@host").expect_err("not amqp");
        assert!(!error.to_string().contains("s3cret"));
    }
}
