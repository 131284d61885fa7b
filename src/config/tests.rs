use std::collections::BTreeMap;

use super::*;

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn parse(text: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("hookbox.toml"), &env(pairs))
}

const SANDBOX: &str = r#"
[[source]]
name = "begini"
environment = "sandbox"
scheme = "begini"
secrets_env = ["BEGINI_API_KEY"]
"#;

#[test]
fn the_spec_example_is_accepted() {
    let text = r#"
[database]
url_env = "DATABASE_URL"
max_connections = 16

[receiver]
listen = "0.0.0.0:8080"
admin_listen = "127.0.0.1:9090"
max_body_bytes = 1048576
request_timeout = "10s"
trusted_proxies = []
tls_terminated_by_proxy = true

[worker]
concurrency = 16
lease = "5m"
poll_interval = "1s"
retry = { max_attempts = 12, initial = "5s", max = "6h", multiplier = 2.0, jitter = 0.2 }

[[source]]
name = "begini"
environment = "production"
scheme = "begini"
secrets_env = ["BEGINI_API_KEY"]
event_key = "body_sha256"
event_type = { json = "/event/type" }
allow_ips = []
rate_limit = { per_second = 200, burst = 400 }
tolerance = "5m"

[[route]]
source = "begini"
event_types = ["psychometric_score.*"]
handler = "scores"

[handler.scores]
kind = "sql"
statement = "SELECT app.record_score($1, $2, $3)"
"#;
    let config = parse(text, &[("BEGINI_API_KEY", "k")]).unwrap();
    assert_eq!(config.sources[0].keys.len(), 1);
    assert_eq!(config.worker.lease.0, Duration::from_secs(300));
}

#[test]
fn an_unknown_key_is_named_with_its_path() {
    let err = parse("[receiver]\nlisen = \"0.0.0.0:1\"\n", &[]).unwrap_err();
    assert_eq!(err.key, "receiver.lisen");
    assert!(
        err.to_string().starts_with("hookbox.toml: receiver.lisen:"),
        "{err}"
    );
}

#[test]
fn a_bad_duration_is_named() {
    let err = parse("[worker]\nlease = \"5 parsecs\"\n", &[]).unwrap_err();
    assert_eq!(err.key, "worker.lease");
}

#[test]
fn a_missing_secret_variable_is_named() {
    let err = parse(SANDBOX, &[]).unwrap_err();
    assert_eq!(err.key, "source[0].secrets_env[0]");
    assert!(err.message.contains("BEGINI_API_KEY"));
}

#[test]
fn an_inline_secret_is_refused_with_directions() {
    let text = SANDBOX.replace("secrets_env = [\"BEGINI_API_KEY\"]", "secret = \"abc\"");
    let err = parse(&text, &[]).unwrap_err();
    assert_eq!(err.key, "source[0].secret");
    assert!(err.message.contains("secrets_env"));
    assert!(!err.to_string().contains("abc"));
}

#[test]
fn a_secret_file_is_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key");
    std::fs::write(&file, "  the-key\n").unwrap();
    let text = SANDBOX.replace(
        "secrets_env = [\"BEGINI_API_KEY\"]",
        &format!("secrets_file = [\"{}\"]", file.display()),
    );
    let config = parse(&text, &[]).unwrap();
    assert_eq!(config.sources[0].keys[0].expose(), b"the-key");
}

#[test]
fn a_secret_shared_across_environments_is_refused() {
    let text = format!(
        "{SANDBOX}\n[[source]]\nname = \"begini-live\"\nenvironment = \"live\"\nscheme = \"begini\"\nsecrets_env = [\"LIVE_KEY\"]\n"
    );
    let err = parse(&text, &[("BEGINI_API_KEY", "same"), ("LIVE_KEY", "same")]).unwrap_err();
    assert_eq!(err.key, "source[1].secrets_env");
    assert!(!err.to_string().contains("same\""));
    assert!(parse(&text, &[("BEGINI_API_KEY", "one"), ("LIVE_KEY", "two")]).is_ok());
}

#[test]
fn production_on_plain_http_is_refused() {
    let text = SANDBOX.replace("sandbox", "production");
    let err = parse(&text, &[("BEGINI_API_KEY", "k")]).unwrap_err();
    assert_eq!(err.key, "receiver.tls");
    let behind_proxy = format!("[receiver]\ntls_terminated_by_proxy = true\n{text}");
    assert!(parse(&behind_proxy, &[("BEGINI_API_KEY", "k")]).is_ok());
}

#[test]
fn a_route_to_an_unknown_handler_is_refused() {
    let text = format!("{SANDBOX}\n[[route]]\nsource = \"begini\"\nhandler = \"nope\"\n");
    let err = parse(&text, &[("BEGINI_API_KEY", "k")]).unwrap_err();
    assert_eq!(err.key, "route[0].handler");
}

#[test]
fn hmac_needs_a_header_and_others_refuse_hmac_keys() {
    let hmac = SANDBOX.replace("scheme = \"begini\"", "scheme = \"hmac\"");
    assert_eq!(
        parse(&hmac, &[("BEGINI_API_KEY", "k")]).unwrap_err().key,
        "source[0].header"
    );
    let prefixed = SANDBOX.replace(
        "scheme = \"begini\"",
        "scheme = \"begini\"\nprefix = \"sha=\"",
    );
    assert_eq!(
        parse(&prefixed, &[("BEGINI_API_KEY", "k")])
            .unwrap_err()
            .key,
        "source[0].prefix"
    );
}

#[test]
fn cidrs_and_bare_addresses_are_accepted() {
    assert_eq!(parse_cidr("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
    assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
    assert!(parse_cidr("10.0.0.0/33").is_err());
}
