//! Header storage: whatever the names and values, no signature header of the
//! scheme and nothing named like a credential is ever stored.
#![no_main]

use hookbox::receiver::headers::{looks_like_credential, stored_headers};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // name 0x00 value 0x00 name 0x00 value ...
    let parts: Vec<&[u8]> = data.split(|b| *b == 0).collect();
    let names: Vec<String> = parts
        .iter()
        .step_by(2)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let pairs: Vec<(&str, &[u8])> = names
        .iter()
        .zip(parts.iter().skip(1).step_by(2))
        .map(|(name, value)| (name.as_str(), *value))
        .collect();
    let private = vec!["x-signature".to_owned(), "webhook-signature".to_owned()];
    let stored = stored_headers(pairs.iter().copied(), &private);
    let map = stored.as_object().expect("an object");
    for name in map.keys() {
        assert_eq!(*name, name.to_ascii_lowercase());
        assert!(!private.contains(name), "{name} stored");
        assert!(!looks_like_credential(name), "{name} stored");
    }
    for (name, _) in &pairs {
        let lower = name.to_ascii_lowercase();
        if !private.contains(&lower) && !looks_like_credential(&lower) {
            assert!(map.contains_key(&lower), "{lower} lost");
        }
    }
});
