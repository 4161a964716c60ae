//! Where a broker is and how to log in to it. Credentials never leave this type in text:
//! `Debug` and `Display` show the redacted address only.

use std::fmt;

use url::Url;

use super::BrokerError;

/// Key of the broker Secret holding `amqp[s]://user:pass@host:port/vhost`.
pub const SECRET_URI_KEY: &str = "uri";
/// Optional key of the broker Secret: `http[s]://host:port` of the management API.
pub const SECRET_MANAGEMENT_KEY: &str = "managementUri";
/// Optional key of the broker Secret: PEM CA certificate(s) to trust.
pub const SECRET_CA_KEY: &str = "ca.crt";

/// A RabbitMQ broker: its AMQP URI (with credentials), management API and trusted CA.
#[derive(Clone)]
pub struct BrokerEndpoint {
    amqp: Url,
    /// Without userinfo: the management API is called with the AMQP URI's credentials, and
    /// a password given in `managementUri` is kept only to redact it.
    management: Url,
    /// Password of `managementUri`, if it carried one (redacted wherever it could appear).
    management_password: Option<String>,
    ca_pem: Option<String>,
}

impl BrokerEndpoint {
    /// Builds an endpoint from a broker Secret's decoded data (keys `uri`, `managementUri`,
    /// `ca.crt`); `management_override` (e.g. a flag) wins over `managementUri`.
    pub fn from_secret_data(
        data: &std::collections::BTreeMap<String, String>,
        management_override: Option<&str>,
        ca_override: Option<String>,
    ) -> Result<Self, BrokerError> {
        let uri = data.get(SECRET_URI_KEY).ok_or(BrokerError::InvalidUri {
            field: "uri",
            reason: "the broker Secret has no key \"uri\"".into(),
        })?;
        let management =
            management_override.or(data.get(SECRET_MANAGEMENT_KEY).map(String::as_str));
        let ca = ca_override.or_else(|| data.get(SECRET_CA_KEY).cloned());
        Self::new(uri, management, ca)
    }

    /// Builds an endpoint from the Secret's keys: `uri` (amqp[s]://user:pass@host:port/vhost),
    /// optional `managementUri` (http[s]://host:port; default: same host, port 15672, or
    /// https on 15671 for amqps) and optional PEM CA (`ca.crt`).
    pub fn new(
        uri: &str,
        management_uri: Option<&str>,
        ca_pem: Option<String>,
    ) -> Result<Self, BrokerError> {
        let amqp = Url::parse(uri.trim()).map_err(|e| BrokerError::InvalidUri {
            field: "uri",
            reason: e.to_string(),
        })?;
        let tls = match amqp.scheme() {
            "amqp" => false,
            "amqps" => true,
            other => {
                return Err(BrokerError::InvalidUri {
                    field: "uri",
                    reason: format!("scheme {other:?} is not amqp or amqps"),
                });
            }
        };
        let host = amqp
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or(BrokerError::InvalidUri {
                field: "uri",
                reason: "no host".into(),
            })?;
        let management = match management_uri {
            Some(text) => {
                let url = Url::parse(text.trim()).map_err(|e| BrokerError::InvalidUri {
                    field: "managementUri",
                    reason: e.to_string(),
                })?;
                if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                    return Err(BrokerError::InvalidUri {
                        field: "managementUri",
                        reason: "must be http(s)://host[:port]".into(),
                    });
                }
                url
            }
            None => {
                let (scheme, port) = if tls {
                    ("https", 15671)
                } else {
                    ("http", 15672)
                };
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.to_string()
                };
                Url::parse(&format!("{scheme}://{host}:{port}/")).map_err(|e| {
                    BrokerError::InvalidUri {
                        field: "uri",
                        reason: e.to_string(),
                    }
                })?
            }
        };
        let management_password = management.password().map(|p| {
            percent_encoding::percent_decode_str(p)
                .decode_utf8_lossy()
                .into_owned()
        });
        let mut management = management;
        // Infallible for http(s) URLs with a host (checked above).
        let _ = management.set_username("");
        let _ = management.set_password(None);
        Ok(Self {
            amqp,
            management,
            management_password,
            ca_pem,
        })
    }

    /// An endpoint known by its management API URL with credentials only
    /// (`http[s]://user:pass@host:port`), for commands that only read over HTTP (`msgpipe
    /// import`): the AMQP URI is the same host and credentials on the default port, never
    /// connected to.
    pub fn from_management_uri(uri: &str, ca_pem: Option<String>) -> Result<Self, BrokerError> {
        let invalid = |reason: String| BrokerError::InvalidUri {
            field: "managementUri",
            reason,
        };
        let url = Url::parse(uri.trim()).map_err(|e| invalid(e.to_string()))?;
        let scheme = match url.scheme() {
            "http" => "amqp",
            "https" => "amqps",
            _ => return Err(invalid("must be http(s)://user:pass@host[:port]".into())),
        };
        let host = url.host_str().ok_or_else(|| invalid("no host".into()))?;
        if url.username().is_empty() {
            return Err(invalid(
                "needs credentials (http://user:pass@host:15672) when no AMQP URI is given".into(),
            ));
        }
        let mut amqp =
            Url::parse(&format!("{scheme}://{host}/")).map_err(|e| invalid(e.to_string()))?;
        // Infallible for amqp(s) URLs with a host.
        let _ = amqp.set_username(url.username());
        let _ = amqp.set_password(url.password());
        Self::new(amqp.as_str(), Some(uri), ca_pem)
    }

    /// The vhost named in the AMQP URI's path (`/` when the path is empty).
    pub fn uri_vhost(&self) -> String {
        let path = self.amqp.path().trim_start_matches('/');
        if path.is_empty() {
            return "/".into();
        }
        percent_encoding::percent_decode_str(path)
            .decode_utf8_lossy()
            .into_owned()
    }

    pub fn username(&self) -> String {
        let user = percent_encoding::percent_decode_str(self.amqp.username()).decode_utf8_lossy();
        if user.is_empty() {
            "guest".into()
        } else {
            user.into_owned()
        }
    }

    pub(crate) fn password(&self) -> String {
        let password = self.amqp.password().unwrap_or("guest");
        percent_encoding::percent_decode_str(password)
            .decode_utf8_lossy()
            .into_owned()
    }

    /// The AMQP URI for `vhost`, with credentials (for the AMQP client only).
    /// The AMQP URI for `vhost`; with `frame_max`, asking for frames of at most that size
    /// unless the user's URI already sets `frame_max`.
    pub(crate) fn amqp_uri_for(&self, vhost: &str, frame_max: Option<u32>) -> String {
        let mut url = self.amqp.clone();
        let encoded: String =
            percent_encoding::utf8_percent_encode(vhost, percent_encoding::NON_ALPHANUMERIC)
                .collect();
        url.set_path(&format!("/{encoded}"));
        if let Some(frame_max) = frame_max
            && !url.query_pairs().any(|(key, _)| key == "frame_max")
        {
            url.query_pairs_mut()
                .append_pair("frame_max", &frame_max.to_string());
        }
        url.to_string()
    }

    /// Base URL of the management API, e.g. `http://host:15672/api`.
    pub fn management_api(&self) -> String {
        format!("{}/api", self.management.as_str().trim_end_matches('/'))
    }

    /// `host:port` of the AMQP listener.
    pub fn amqp_address(&self) -> Option<String> {
        let host = self.amqp.host_str()?;
        let port = self
            .amqp
            .port()
            .unwrap_or(if self.is_tls() { 5671 } else { 5672 });
        Some(format!("{host}:{port}"))
    }

    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    pub fn is_tls(&self) -> bool {
        self.amqp.scheme() == "amqps"
    }

    /// Identity for connection pooling: same address, user, password and CA share a pool
    /// entry. Holds the password: compare it, never print it.
    pub fn pool_key(&self) -> String {
        format!(
            "{}|{}|{}",
            self.amqp,
            self.management,
            self.ca_pem.as_deref().unwrap_or("")
        )
    }

    /// Removes this endpoint's passwords (of `uri` and `managementUri`, raw and decoded) and
    /// the userinfo of any URL from `text`, whatever the password's length.
    pub fn redact(&self, text: &str) -> String {
        let mut secrets = vec![
            self.password(),
            self.amqp.password().unwrap_or("").to_string(),
        ];
        secrets.extend(self.management_password.clone());
        redact_secrets(text, &secrets)
    }
}

/// `text` without URL userinfo (`scheme://user:pass@` becomes `scheme://user:***@`) and
/// without any of `secrets`. A secret shorter than 3 characters is replaced only where it
/// stands alone (not inside a longer word), so short passwords are hidden without mangling
/// every word that happens to contain them.
pub(crate) fn redact_secrets(text: &str, secrets: &[String]) -> String {
    let mut out = strip_userinfo(text);
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        out = if secret.chars().count() >= 3 {
            out.replace(secret.as_str(), "***")
        } else {
            replace_standalone(&out, secret)
        };
    }
    out
}

/// Replaces the password part of every `://user:password@` in `text`.
fn strip_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(tail.len());
        let authority = &tail[..authority_end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                let user = userinfo.split(':').next().unwrap_or_default();
                out.push_str(user);
                if userinfo.contains(':') {
                    out.push_str(":***");
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[authority_end..];
    }
    out.push_str(rest);
    out
}

/// Replaces `secret` where it is not part of a longer alphanumeric run.
fn replace_standalone(text: &str, secret: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut previous: Option<char> = None;
    while let Some(found) = rest.find(secret) {
        let before = rest[..found].chars().next_back().or(previous);
        let after = rest[found + secret.len()..].chars().next();
        let word = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
        out.push_str(&rest[..found]);
        if word(before) || word(after) {
            out.push_str(secret);
        } else {
            out.push_str("***");
        }
        previous = secret.chars().next_back();
        rest = &rest[found + secret.len()..];
    }
    out.push_str(rest);
    out
}

impl fmt::Display for BrokerEndpoint {
    /// `amqp://user@host:5672` — never the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = self.amqp.host_str().unwrap_or("?");
        let port = self
            .amqp
            .port()
            .unwrap_or(if self.is_tls() { 5671 } else { 5672 });
        write!(
            f,
            "{}://{}@{host}:{port}",
            self.amqp.scheme(),
            self.username()
        )
    }
}

impl fmt::Debug for BrokerEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerEndpoint")
            .field("amqp", &self.to_string())
            .field("management", &self.management.as_str())
            .field(
                "management_password",
                &self.management_password.as_ref().map(|_| "***"),
            )
            .field("ca", &self.ca_pem.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_management_to_the_amqp_host() {
        let e = BrokerEndpoint::new("amqp://app:s3cr3t@rabbit.example:5672/orders", None, None)
            .expect("valid");
        assert_eq!(e.management_api(), "http://rabbit.example:15672/api");
        assert_eq!(e.uri_vhost(), "orders");
        let tls =
            BrokerEndpoint::new("amqps://app:s3cr3t@rabbit.example/", None, None).expect("valid");
        assert_eq!(tls.management_api(), "https://rabbit.example:15671/api");
        assert_eq!(tls.uri_vhost(), "/");
    }

    #[test]
    fn encoded_vhost_and_credentials_are_decoded() {
        let e = BrokerEndpoint::new("amqp://us%40er:p%2Fss@h/%2F", None, None).expect("valid");
        assert_eq!(
            (
                e.username().as_str(),
                e.password().as_str(),
                e.uri_vhost().as_str()
            ),
            ("us@er", "p/ss", "/")
        );
        assert!(e.amqp_uri_for("a/b", None).ends_with("/a%2Fb"));
        assert!(
            e.amqp_uri_for("a/b", Some(16384))
                .ends_with("/a%2Fb?frame_max=16384")
        );
    }

    #[test]
    fn display_debug_and_errors_never_show_the_password() {
        let e = BrokerEndpoint::new("amqp://app:hunter2@h:5672/v", None, None).expect("valid");
        assert_eq!(e.to_string(), "amqp://app@h:5672");
        assert!(!format!("{e:?}").contains("hunter2"));
        assert_eq!(e.redact("auth failed for hunter2"), "auth failed for ***");
        let err =
            BrokerEndpoint::new("http://app:hunter2@h", None, None).expect_err("wrong scheme");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = BrokerEndpoint::new("amqp://app:hunter2@", None, None).expect_err("no host");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn short_passwords_and_management_credentials_are_redacted_too() {
        let e = BrokerEndpoint::new(
            "amqp://app:Q7@h:5672/v",
            Some("http://admin:mgmtpw@h:15672"),
            None,
        )
        .expect("valid");
        assert_eq!(e.management_api(), "http://h:15672/api");
        let debug = format!("{e:?}");
        assert!(
            !debug.contains("Q7") && !debug.contains("mgmtpw"),
            "{debug}"
        );
        assert_eq!(
            e.redact("connect amqp://app:Q7@h:5672/v failed: bad password Q7; mgmtpw"),
            "connect amqp://app:***@h:5672/v failed: bad password ***; ***"
        );
        // A short password inside a longer word is not a leak; the word stays readable.
        assert_eq!(e.redact("Q7x and xQ7 stay"), "Q7x and xQ7 stay");
        assert_eq!(
            redact_secrets("http://u:a@h/ and (a)", &["a".into()]),
            "http://u:***@h/ and (***)"
        );
    }

    #[test]
    fn a_management_uri_alone_gives_an_endpoint_that_never_shows_its_password() {
        let endpoint = BrokerEndpoint::from_management_uri(
            "https://reader:s3cr%40t-pw@rabbit.example:15671",
            None,
        )
        .expect("endpoint");
        assert_eq!(
            endpoint.management_api(),
            "https://rabbit.example:15671/api"
        );
        assert_eq!(endpoint.username(), "reader");
        assert_eq!(endpoint.password(), "s3cr@t-pw");
        assert!(endpoint.is_tls());
        for text in [endpoint.to_string(), format!("{endpoint:?}")] {
            assert!(!text.contains("s3cr"), "{text}");
        }
        let refused = BrokerEndpoint::from_management_uri("http://rabbit:15672", None)
            .expect_err("no credentials");
        assert!(
            refused.to_string().contains("needs credentials"),
            "{refused}"
        );
        assert!(BrokerEndpoint::from_management_uri("amqp://u:p@rabbit", None).is_err());
    }
}
