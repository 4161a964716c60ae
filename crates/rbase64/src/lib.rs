//! Stands in for [rbase64](https://crates.io/crates/rbase64) 2.0, which
//! `rabbitmq_http_client` uses for one call (`encode`, when it hashes a password) and which
//! installs mimalloc as the `#[global_allocator]` of every program that links it. A library
//! must not choose the allocator of the program: msgpipe's binaries choose it themselves
//! (jemalloc, measured in `make bench-operator`; README, "Benchmarks"). The root
//! `Cargo.toml` patches crates.io's rbase64 with this crate.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Standard base64 (RFC 4648 alphabet, `=` padding), as rbase64's `encode`.
pub fn encode(input: &[u8]) -> String {
    STANDARD.encode(input)
}

#[cfg(test)]
mod tests {
    #[test]
    fn encodes_like_rfc_4648() {
        // RFC 4648 §10 test vectors.
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::encode(input.as_bytes()), expected);
        }
    }
}
