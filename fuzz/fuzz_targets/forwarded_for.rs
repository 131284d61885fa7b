//! `X-Forwarded-For` walking: never panics; an untrusted peer is the client
//! whatever the header says; a trusted peer's client is the peer or an address
//! named in the header.
#![no_main]

use std::net::IpAddr;

use hookbox::receiver::network::client_address;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let values: Vec<&str> = text.split('\n').collect();
    let trusted = vec![
        "10.0.0.0/8".parse().unwrap(),
        "192.0.2.0/24".parse().unwrap(),
        "2001:db8::/32".parse().unwrap(),
    ];
    let untrusted_peer: IpAddr = "203.0.113.9".parse().unwrap();
    assert_eq!(
        client_address(Some(untrusted_peer), &values, &trusted),
        Some(untrusted_peer)
    );
    let trusted_peer: IpAddr = "10.1.2.3".parse().unwrap();
    let client = client_address(Some(trusted_peer), &values, &trusted).expect("a client");
    let named = values
        .iter()
        .flat_map(|v| v.split(','))
        .filter_map(|hop| hop.trim().parse::<IpAddr>().ok())
        .any(|ip| canonical(ip) == client);
    assert!(client == trusted_peer || named, "{client} came from nowhere");
    assert_eq!(client_address(None, &values, &trusted), None);
});

/// `::ffff:a.b.c.d` is the IPv4 client `a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}
