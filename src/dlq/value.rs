//! AMQP header values as text and JSON. Header values are external input: every type is
//! accepted, nothing panics, and timestamps become RFC 3339.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use k8s_openapi::jiff::Timestamp;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Map, Value, json};

/// A header as text: strings as they are (lossy UTF-8), numbers in decimal, AMQP timestamps
/// as RFC 3339. Tables and arrays have no text form.
pub fn header_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        AMQPValue::ByteArray(b) => Some(String::from_utf8_lossy(b.as_slice()).into_owned()),
        AMQPValue::Timestamp(_) => timestamp_text(value),
        AMQPValue::Boolean(b) => Some(b.to_string()),
        other => integer(other).map(|n| n.to_string()),
    }
}

/// A header as a count: any non-negative integer type, or a decimal string.
pub fn header_u64(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => {
            header_text(value)?.trim().parse().ok()
        }
        other => integer(other).and_then(|n| u64::try_from(n).ok()),
    }
}

/// An AMQP timestamp (seconds since the epoch) as RFC 3339; other types as their text.
pub fn timestamp_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::Timestamp(seconds) => i64::try_from(*seconds)
            .ok()
            .and_then(|s| Timestamp::from_second(s).ok())
            .map(|t| t.to_string()),
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) => None,
        other => header_text(other),
    }
}

fn integer(value: &AMQPValue) -> Option<i128> {
    Some(match value {
        AMQPValue::ShortShortInt(n) => i128::from(*n),
        AMQPValue::ShortShortUInt(n) => i128::from(*n),
        AMQPValue::ShortInt(n) => i128::from(*n),
        AMQPValue::ShortUInt(n) => i128::from(*n),
        AMQPValue::LongInt(n) => i128::from(*n),
        AMQPValue::LongUInt(n) => i128::from(*n),
        AMQPValue::LongLongInt(n) => i128::from(*n),
        _ => return None,
    })
}

/// A header value as JSON, for `show -o json|yaml` and the text view. Strings that are not
/// UTF-8 become `{"base64": ...}`; timestamps become RFC 3339 strings.
pub fn to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(d) => json!(d),
        AMQPValue::DecimalValue(d) => json!({"scale": d.scale, "value": d.value}),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => bytes_json(s.as_bytes()),
        AMQPValue::ByteArray(b) => bytes_json(b.as_slice()),
        AMQPValue::FieldArray(items) => {
            Value::Array(items.as_slice().iter().map(to_json).collect())
        }
        AMQPValue::FieldTable(table) => Value::Object(table_json(table)),
        AMQPValue::Timestamp(_) => timestamp_text(value).map_or(Value::Null, Value::String),
        AMQPValue::Void => Value::Null,
        other => integer(other).map_or(Value::Null, |n| {
            i64::try_from(n)
                .map(Value::from)
                .or_else(|_| u64::try_from(n).map(Value::from))
                .unwrap_or(Value::Null)
        }),
    }
}

/// Every entry of a table as JSON, keys sorted.
pub fn table_json(table: &FieldTable) -> Map<String, Value> {
    table
        .inner()
        .iter()
        .map(|(key, value)| (key.as_str().to_string(), to_json(value)))
        .collect()
}

fn bytes_json(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => json!(text),
        Err(_) => json!({ "base64": BASE64.encode(bytes) }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use lapin::types::{DecimalValue, ShortString};

    pub(crate) fn long(text: &str) -> AMQPValue {
        AMQPValue::LongString(text.into())
    }

    pub(crate) fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in entries {
            table.insert(ShortString::from(*key), value.clone());
        }
        table
    }

    #[test]
    fn counts_accept_every_integer_type_and_decimal_strings_only() {
        assert_eq!(header_u64(&AMQPValue::LongInt(3)), Some(3));
        assert_eq!(header_u64(&AMQPValue::ShortShortUInt(7)), Some(7));
        assert_eq!(
            header_u64(&AMQPValue::LongLongInt(i64::MAX)),
            Some(i64::MAX as u64)
        );
        assert_eq!(header_u64(&long(" 12 ")), Some(12));
        assert_eq!(header_u64(&AMQPValue::LongLongInt(-1)), None);
        assert_eq!(header_u64(&long("five")), None);
        assert_eq!(header_u64(&AMQPValue::Double(2.0)), None);
    }

    #[test]
    fn timestamps_are_rfc3339_and_binary_strings_base64() {
        assert_eq!(
            header_text(&AMQPValue::Timestamp(0)).as_deref(),
            Some("1970-01-01T00:00:00Z")
        );
        assert_eq!(timestamp_text(&AMQPValue::Timestamp(u64::MAX)), None);
        let binary = AMQPValue::LongString(vec![0xff, 0x00].into());
        assert_eq!(to_json(&binary), json!({"base64": "/wA="}));
        let nested = AMQPValue::FieldArray(
            vec![AMQPValue::FieldTable(table(&[
                ("count", AMQPValue::LongLongInt(2)),
                ("time", AMQPValue::Timestamp(60)),
            ]))]
            .into(),
        );
        assert_eq!(
            to_json(&nested),
            json!([{"count": 2, "time": "1970-01-01T00:01:00Z"}])
        );
        assert_eq!(
            to_json(&AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 5
            })),
            json!({"scale": 2, "value": 5})
        );
    }
}
