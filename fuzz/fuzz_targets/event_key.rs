//! Event key and type extraction from arbitrary payloads and headers: never panics.
#![no_main]

use hookbox::event_key::{sha256_hex, EventKeySpec, FieldSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (header, body) = match data.iter().position(|b| *b == 0xFF) {
        Some(i) => (String::from_utf8_lossy(&data[..i]).into_owned(), &data[i + 1..]),
        None => (String::new(), data),
    };
    let headers = [("webhook-id", header.as_str()), ("X-Event-Type", header.as_str())];
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let sha = sha256_hex(body);
    let specs = [
        EventKeySpec::BodySha256,
        EventKeySpec::Json(vec!["/integration_id".into(), "/uid".into(), "/event/type".into()]),
        EventKeySpec::Json(vec!["".into(), "/a~1b/0".into()]),
        EventKeySpec::Header("webhook-id".into()),
    ];
    for spec in &specs {
        if let Ok(key) = spec.extract(&sha, json.as_ref(), headers.as_slice()) {
            assert!(!key.is_empty() || matches!(spec, EventKeySpec::Json(_)));
        }
    }
    for field in [FieldSpec::Json("/event/type".into()), FieldSpec::Header("X-Event-Type".into())] {
        let _ = field.extract(json.as_ref(), headers.as_slice());
    }
});
