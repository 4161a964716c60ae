//! Everything about one dead letter, for `msgpipe dlq show`: its failure summary, every
//! property and header, and the body as text when it is text.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use lapin::BasicProperties;
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::letter::{DeadLetter, RawDeadLetter};
use super::value::{table_json, timestamp_text};

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterDetail {
    pub summary: DeadLetter,
    /// Exchange and routing key the message reached the DLQ with.
    pub exchange: String,
    pub routing_key: String,
    /// The AMQP properties that are set (headers apart).
    pub properties: Map<String, Value>,
    pub headers: Map<String, Value>,
    pub body: Body,
}

/// A message body: UTF-8 text as it is, anything else in base64.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Body {
    pub encoding: BodyEncoding,
    pub data: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyEncoding {
    #[serde(rename = "utf-8")]
    Utf8,
    Base64,
}

impl DeadLetterDetail {
    pub fn of(raw: &RawDeadLetter) -> Self {
        DeadLetterDetail {
            summary: DeadLetter::interpret(raw),
            exchange: raw.exchange.clone(),
            routing_key: raw.routing_key.clone(),
            properties: properties_json(&raw.properties),
            headers: raw.headers().map(table_json).unwrap_or_default(),
            body: Body::of(&raw.body),
        }
    }
}

impl Body {
    pub fn of(bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(text) => Body {
                encoding: BodyEncoding::Utf8,
                data: text.to_string(),
            },
            Err(_) => Body {
                encoding: BodyEncoding::Base64,
                data: BASE64.encode(bytes),
            },
        }
    }
}

/// Whether bytes can go to a terminal as they are: UTF-8 without control characters other
/// than newline, carriage return and tab (no escape sequences from message bodies).
pub fn is_printable_text(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok_and(|text| {
        text.chars()
            .all(|c| !c.is_control() || matches!(c, '\n' | '\r' | '\t'))
    })
}

/// `xxd`-style dump: offset, 16 bytes in hex, and their printable ASCII.
pub fn hex_dump(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (line, chunk) in bytes.chunks(16).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let ascii: String = chunk
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    char::from(b)
                } else {
                    '.'
                }
            })
            .collect();
        out.push_str(&format!(
            "{:08x}  {:<47}  {ascii}\n",
            line * 16,
            hex.join(" ")
        ));
    }
    out
}

fn properties_json(p: &BasicProperties) -> Map<String, Value> {
    let mut map = Map::new();
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            map.insert(key.to_string(), value);
        }
    };
    let text = |s: &Option<lapin::types::ShortString>| s.as_ref().map(|s| json!(s.as_str()));
    put("messageId", text(p.message_id()));
    put("correlationId", text(p.correlation_id()));
    put("contentType", text(p.content_type()));
    put("contentEncoding", text(p.content_encoding()));
    put("deliveryMode", p.delivery_mode().map(|m| json!(m)));
    put("priority", p.priority().map(|m| json!(m)));
    put("replyTo", text(p.reply_to()));
    put("expiration", text(p.expiration()));
    put(
        "timestamp",
        p.timestamp()
            .and_then(|t| timestamp_text(&lapin::types::AMQPValue::Timestamp(t)))
            .map(Value::String),
    );
    put("type", text(p.kind()));
    put("userId", text(p.user_id()));
    put("appId", text(p.app_id()));
    put("clusterId", text(p.cluster_id()));
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlq::value::tests::{long, table};

    #[test]
    fn detail_lists_set_properties_headers_and_a_text_body() {
        let raw = RawDeadLetter {
            index: 2,
            exchange: "notes_dlq_exchange".into(),
            routing_key: "notes".into(),
            properties: BasicProperties::default()
                .with_message_id("m-2".into())
                .with_delivery_mode(2)
                .with_timestamp(0)
                .with_headers(table(&[("x-msgpipe-error", long("boom"))])),
            body: "héllo".as_bytes().to_vec(),
        };
        let detail = DeadLetterDetail::of(&raw);
        assert_eq!(
            Value::Object(detail.properties),
            json!({"messageId": "m-2", "deliveryMode": 2, "timestamp": "1970-01-01T00:00:00Z"})
        );
        assert_eq!(detail.headers["x-msgpipe-error"], json!("boom"));
        assert_eq!(detail.body.encoding, BodyEncoding::Utf8);
        assert_eq!(detail.body.data, "héllo");
        assert_eq!(detail.summary.error.as_deref(), Some("boom"));
    }

    #[test]
    fn binary_bodies_are_base64_in_data_and_hex_on_a_terminal() {
        let bytes = [0u8, 159, 146, 150, b'a'];
        assert_eq!(Body::of(&bytes).encoding, BodyEncoding::Base64);
        assert_eq!(Body::of(&bytes).data, "AJ+SlmE=");
        assert!(!is_printable_text(&bytes));
        assert!(!is_printable_text(b"\x1b[31mred"));
        assert!(is_printable_text(b"line 1\nline\t2"));
        assert_eq!(
            hex_dump(b"0123456789abcdefXY"),
            "00000000  30 31 32 33 34 35 36 37 38 39 61 62 63 64 65 66  0123456789abcdef\n\
             00000010  58 59                                            XY\n"
        );
    }
}
