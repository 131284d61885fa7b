//! Configuration parsing: any text is accepted or refused with a message
//! naming a key, never a panic, and a refusal never quotes a secret's value.
#![no_main]

use std::{collections::BTreeMap, path::Path};

use hookbox::config::{Config, ProcessRole};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-secret-value-0123456789";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env: BTreeMap<String, String> = [
        ("BEGINI_API_KEY", SECRET),
        ("DATABASE_URL", "postgres://fuzz@127.0.0.1/fuzz"),
        ("SVIX_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for role in [ProcessRole::All, ProcessRole::Receiver, ProcessRole::Worker] {
        match Config::parse_for(text, Path::new("fuzz.toml"), &env, role) {
            Ok(config) => {
                let _ = config.database_url_from(&env);
            }
            Err(error) => {
                assert!(!error.key.is_empty());
                if !text.contains(SECRET) {
                    assert!(!error.to_string().contains(SECRET), "{error}");
                }
            }
        }
    }
});
