//! Request headers as stored with the event: credentials and signatures removed.

/// The headers to store: every header except the scheme's signature headers
/// (`private`, lowercase) and anything whose name looks like a credential.
/// Repeated headers are joined with `, `.
pub fn stored_headers<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    private: &[String],
) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (name, value) in headers {
        let name = name.to_ascii_lowercase();
        if private.contains(&name) || looks_like_credential(&name) {
            continue;
        }
        let value = String::from_utf8_lossy(value).into_owned();
        match map.get_mut(&name) {
            Some(serde_json::Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(&value);
            }
            _ => {
                map.insert(name, serde_json::Value::String(value));
            }
        }
    }
    serde_json::Value::Object(map)
}

/// Header names that carry credentials, whatever the scheme.
pub fn looks_like_credential(name: &str) -> bool {
    const WORDS: [&str; 7] = [
        "authorization",
        "cookie",
        "secret",
        "token",
        "signature",
        "password",
        "api-key",
    ];
    let name = name.to_ascii_lowercase();
    WORDS.iter().any(|word| name.contains(word))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_and_credentials_are_never_stored_in_any_case() {
        let headers: [(&str, &[u8]); 4] = [
            ("X-Signature", b"abc"),
            ("Authorization", b"Bearer t"),
            ("X-Api-Key", b"k"),
            ("Content-Type", b"application/json"),
        ];
        let stored = stored_headers(headers, &["x-signature".into()]);
        assert_eq!(
            stored,
            serde_json::json!({ "content-type": "application/json" })
        );
    }
}
