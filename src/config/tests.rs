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

/// A key long enough for the minimum length.
const KEY: &str = "test-begini-api-key-5f2c";

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
    let config = parse(text, &[("BEGINI_API_KEY", KEY)]).unwrap();
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
    std::fs::write(&file, "  the-key-of-sixteen-bytes\n").unwrap();
    let text = SANDBOX.replace(
        "secrets_env = [\"BEGINI_API_KEY\"]",
        &format!("secrets_file = [\"{}\"]", file.display()),
    );
    let config = parse(&text, &[]).unwrap();
    assert_eq!(
        config.sources[0].keys[0].expose(),
        b"the-key-of-sixteen-bytes"
    );
}

#[test]
fn a_secret_shared_across_environments_is_refused() {
    let text = format!(
        "{SANDBOX}\n[[source]]\nname = \"begini-staging\"\nenvironment = \"staging\"\nscheme = \"begini\"\nsecrets_env = [\"LIVE_KEY\"]\n"
    );
    let same = "the-same-key-in-both-places";
    let err = parse(&text, &[("BEGINI_API_KEY", same), ("LIVE_KEY", same)]).unwrap_err();
    assert_eq!(err.key, "source[1].secrets_env");
    assert!(!err.to_string().contains(same));
    assert!(parse(
        &text,
        &[
            ("BEGINI_API_KEY", KEY),
            ("LIVE_KEY", "another-key-of-24-bytes!")
        ]
    )
    .is_ok());
}

#[test]
fn production_on_plain_http_is_refused() {
    let text = SANDBOX.replace("sandbox", "production");
    let err = parse(&text, &[("BEGINI_API_KEY", KEY)]).unwrap_err();
    assert_eq!(err.key, "receiver.tls");
    let behind_proxy = format!("[receiver]\ntls_terminated_by_proxy = true\n{text}");
    assert!(parse(&behind_proxy, &[("BEGINI_API_KEY", KEY)]).is_ok());
}

#[test]
fn a_route_to_an_unknown_handler_is_refused() {
    let text = format!("{SANDBOX}\n[[route]]\nsource = \"begini\"\nhandler = \"nope\"\n");
    let err = parse(&text, &[("BEGINI_API_KEY", KEY)]).unwrap_err();
    assert_eq!(err.key, "route[0].handler");
}

#[test]
fn hmac_needs_a_header_and_others_refuse_hmac_keys() {
    let hmac = SANDBOX.replace("scheme = \"begini\"", "scheme = \"hmac\"");
    assert_eq!(
        parse(&hmac, &[("BEGINI_API_KEY", KEY)]).unwrap_err().key,
        "source[0].header"
    );
    let prefixed = SANDBOX.replace(
        "scheme = \"begini\"",
        "scheme = \"begini\"\nprefix = \"sha=\"",
    );
    assert_eq!(
        parse(&prefixed, &[("BEGINI_API_KEY", KEY)])
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

#[test]
fn a_secret_shorter_than_sixteen_bytes_is_refused_without_echoing_it() {
    let err = parse(SANDBOX, &[("BEGINI_API_KEY", "short-key")]).unwrap_err();
    assert_eq!(err.key, "source[0].secrets_env[0]");
    assert!(err.message.contains("at least 16"), "{err}");
    assert!(!err.to_string().contains("short-key"));
}

#[test]
fn a_tolerance_over_an_hour_is_refused() {
    let text = format!("{SANDBOX}tolerance = \"2h\"\n");
    assert_eq!(
        parse(&text, &[("BEGINI_API_KEY", KEY)]).unwrap_err().key,
        "source[0].tolerance"
    );
    let hour = format!("{SANDBOX}tolerance = \"1h\"\n");
    assert!(parse(&hour, &[("BEGINI_API_KEY", KEY)]).is_ok());
}

#[test]
fn prod_and_live_are_production_for_the_tls_rule() {
    for name in ["prod", "live", "Production", "LIVE"] {
        let text = SANDBOX.replace("\"sandbox\"", &format!("\"{name}\""));
        let err = parse(&text, &[("BEGINI_API_KEY", KEY)]).unwrap_err();
        assert_eq!(err.key, "receiver.tls", "{name}");
    }
}

#[test]
fn trusting_every_address_as_a_proxy_is_refused() {
    for everything in ["0.0.0.0/0", "::/0"] {
        let text =
            format!("[receiver]\ntrusted_proxies = [\"10.0.0.0/8\", \"{everything}\"]\n{SANDBOX}");
        let err = parse(&text, &[("BEGINI_API_KEY", KEY)]).unwrap_err();
        assert_eq!(err.key, "receiver.trusted_proxies[1]");
    }
}

#[test]
fn a_world_readable_secret_file_is_accepted_with_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key");
    std::fs::write(&file, KEY).unwrap();
    let text = SANDBOX.replace(
        "secrets_env = [\"BEGINI_API_KEY\"]",
        &format!("secrets_file = [\"{}\"]", file.display()),
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = parse(&text, &[]).unwrap();
    assert_eq!(config.warnings.len(), 1);
    assert!(config.warnings[0].contains("source[0].secrets_file[0]"));
    assert!(config.warnings[0].contains("chmod 600"));
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(parse(&text, &[]).unwrap().warnings.is_empty());
}

#[test]
fn a_header_event_key_is_refused_unless_the_scheme_signs_that_header() {
    let text = format!("{SANDBOX}event_key = {{ header = \"X-Request-Id\" }}\n");
    let err = parse(&text, &[("BEGINI_API_KEY", KEY)]).unwrap_err();
    assert_eq!(err.key, "source[0].event_key");
    assert!(err.message.contains("does not sign"), "{err}");
    let standard = r#"
[[source]]
name = "svix"
environment = "sandbox"
scheme = "standard-webhooks"
secrets_env = ["SVIX_SECRET"]
event_key = { header = "webhook-id" }
"#;
    let secret = [("SVIX_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")];
    assert!(parse(standard, &secret).is_ok());
    let unsigned = standard.replace("webhook-id", "x-request-id");
    assert_eq!(
        parse(&unsigned, &secret).unwrap_err().key,
        "source[0].event_key"
    );
}

#[test]
fn each_process_resolves_only_the_secrets_of_its_own_job() {
    let text = format!(
        "{SANDBOX}\n[handler.forward]\nkind = \"http\"\nurl = \"https://example.com/\"\nsigning_secret_env = \"DOWNSTREAM\"\n"
    );
    let downstream = [("DOWNSTREAM", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")];
    let source = [("BEGINI_API_KEY", KEY)];
    let at = Path::new("hookbox.toml");
    let worker = Config::parse_for(&text, at, &env(&downstream), ProcessRole::Worker).unwrap();
    assert!(worker.sources[0].keys.is_empty());
    assert!(worker.handlers["forward"].signing_key.is_some());
    let receiver = Config::parse_for(&text, at, &env(&source), ProcessRole::Receiver).unwrap();
    assert_eq!(receiver.sources[0].keys.len(), 1);
    assert!(receiver.handlers["forward"].signing_key.is_none());
    assert!(
        parse(&text, &source).is_err(),
        "config check needs every secret"
    );
}

#[test]
fn the_database_url_comes_from_the_variable_else_from_url_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("database-url");
    std::fs::write(&file, "postgres://postgres@127.0.0.1:5999/hookbox\n").unwrap();
    let text = format!("[database]\nurl_file = \"{}\"\n", file.display());
    let config = parse(&text, &[]).unwrap();
    assert_eq!(
        config.database_url_from(&env(&[])).unwrap(),
        "postgres://postgres@127.0.0.1:5999/hookbox"
    );
    assert_eq!(
        config
            .database_url_from(&env(&[("DATABASE_URL", "postgres://elsewhere/db")]))
            .unwrap(),
        "postgres://elsewhere/db"
    );
}

#[test]
fn a_worker_admin_address_may_be_a_range_of_ports() {
    assert!(parse("[worker]\nadmin_listen = \"127.0.0.1:9091-9099\"\n", &[]).is_ok());
    assert_eq!(
        parse("[worker]\nadmin_listen = \"127.0.0.1:9099-9091\"\n", &[])
            .unwrap_err()
            .key,
        "worker.admin_listen"
    );
}

/// Found by the config_parse fuzz target: a key with an empty name made an
/// error that named no place in the file.
#[test]
fn a_mistake_under_an_empty_key_still_names_a_place() {
    let error = parse("''=''''''", &[]).unwrap_err();
    assert!(!error.key.is_empty(), "{error}");
    assert!(error.to_string().starts_with("hookbox.toml: "), "{error}");
}

#[test]
fn partitions_cover_a_minute_to_a_year_and_are_made_one_to_a_hundred_ahead() {
    let config = parse(SANDBOX, &[("BEGINI_API_KEY", KEY)]).unwrap();
    assert_eq!(
        (
            config.worker.partition_interval.0,
            config.worker.partitions_ahead
        ),
        (Duration::from_secs(86_400), 3)
    );
    let soak = format!("{SANDBOX}\n[worker]\npartition_interval = \"5m\"\npartitions_ahead = 12\n");
    let config = parse(&soak, &[("BEGINI_API_KEY", KEY)]).unwrap();
    assert_eq!(config.worker.partition_interval.0, Duration::from_secs(300));
    for (setting, key) in [
        ("partition_interval = \"30s\"", "worker.partition_interval"),
        ("partition_interval = \"400d\"", "worker.partition_interval"),
        (
            "partition_interval = \"90500ms\"",
            "worker.partition_interval",
        ),
        ("partitions_ahead = 0", "worker.partitions_ahead"),
        ("partitions_ahead = 101", "worker.partitions_ahead"),
    ] {
        let text = format!("{SANDBOX}\n[worker]\n{setting}\n");
        let err = parse(&text, &[("BEGINI_API_KEY", KEY)]).unwrap_err();
        assert_eq!(err.key, key, "{setting}");
    }
}
