//! Who is calling: the peer address, or the client a trusted proxy names.

use std::net::IpAddr;

use ipnet::IpNet;

/// The client's address. `X-Forwarded-For` is believed only when the peer is a
/// trusted proxy, and only as far back as the chain stays within trusted
/// proxies: the right-most address that is not a trusted proxy is the client.
pub fn client_address(
    peer: Option<IpAddr>,
    forwarded_for: &[&str],
    trusted_proxies: &[IpNet],
) -> Option<IpAddr> {
    let peer = peer.map(canonical)?;
    let is_trusted = |ip: &IpAddr| trusted_proxies.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let mut client = peer;
    let hops = forwarded_for
        .iter()
        .flat_map(|value| value.split(','))
        .map(str::trim);
    for hop in hops.collect::<Vec<_>>().into_iter().rev() {
        let Ok(ip) = hop.parse::<IpAddr>().map(canonical) else {
            // An unparsable hop ends the chain we can vouch for.
            break;
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    Some(client)
}

/// IPv4 peers on a dual-stack socket arrive as `::ffff:a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

pub fn is_allowed(client: Option<IpAddr>, allow: &[IpNet]) -> bool {
    allow.is_empty() || client.is_some_and(|ip| allow.iter().any(|net| net.contains(&ip)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn forwarded_for_from_an_untrusted_peer_is_ignored() {
        assert_eq!(
            client_address(ip("203.0.113.9"), &["10.0.0.1"], &nets(&["10.0.0.0/8"])),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let trusted = nets(&["10.0.0.0/8"]);
        let got = client_address(
            ip("10.0.0.2"),
            &["198.51.100.7, 203.0.113.5, 10.0.0.3"],
            &trusted,
        );
        assert_eq!(
            got,
            ip("203.0.113.5"),
            "a spoofed left-most entry is not believed"
        );
    }

    #[test]
    fn garbage_in_the_chain_stops_the_walk() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_address(ip("10.0.0.2"), &["nonsense"], &trusted),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn mapped_ipv4_matches_ipv4_lists() {
        assert!(is_allowed(
            client_address(ip("::ffff:192.0.2.1"), &[], &[]),
            &nets(&["192.0.2.0/24"])
        ));
        assert!(!is_allowed(ip("192.0.3.1"), &nets(&["192.0.2.0/24"])));
        assert!(is_allowed(None, &[]));
    }
}
