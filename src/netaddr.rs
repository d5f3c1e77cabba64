//! The client's address behind trusted proxies. A request's peer is the client unless it is a
//! proxy the operator trusts (`server.trusted_proxies`); then the one forwarding header the
//! operator named (`server.client_ip_header`: `X-Forwarded-For`, or RFC 7239 `Forwarded`) is
//! read right to left, each hop believed only while the hop that reported it is trusted. The
//! first address a trusted hop reports that is not itself trusted is the client. Anyone else's
//! forwarding headers are ignored, and a malformed hop ends the walk at the last address known
//! for sure. Rules, throttling, audit and the access log all use the address found here.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

/// Which forwarding header names the client behind a trusted proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientIpHeader {
    XForwardedFor,
    Forwarded,
}

impl ClientIpHeader {
    pub fn parse(s: &str) -> Option<ClientIpHeader> {
        match s.to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Some(ClientIpHeader::XForwardedFor),
            "forwarded" => Some(ClientIpHeader::Forwarded),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ClientIpHeader::XForwardedFor => "x-forwarded-for",
            ClientIpHeader::Forwarded => "forwarded",
        }
    }
}

/// Whether `ip` is in one of `nets` (an IPv4-mapped IPv6 address counts as its IPv4 one).
pub fn in_any(ip: IpAddr, nets: &[IpNet]) -> bool {
    let ip = canonical(ip);
    nets.iter().any(|n| n.contains(&ip))
}

/// The client of a request that came from `peer`.
pub fn client_address(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
    header: ClientIpHeader,
) -> IpAddr {
    let mut client = canonical(peer);
    if !in_any(client, trusted) {
        return client;
    }
    // Every field of the header, in order: several header lines read as one list. Split as
    // bytes: a line with a byte that is not text (which only a client can have put there) must
    // not hide the entries a proxy appended to it.
    let hops: Vec<&[u8]> = headers
        .get_all(header.name())
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .collect();
    for hop in hops.iter().rev() {
        let text = std::str::from_utf8(hop).unwrap_or("");
        let parsed = match header {
            ClientIpHeader::XForwardedFor => parse_hop(text.trim()),
            ClientIpHeader::Forwarded => forwarded_for(text),
        };
        let Some(ip) = parsed else {
            break;
        };
        client = canonical(ip);
        if !in_any(client, trusted) {
            break;
        }
    }
    client
}

/// The `for=` of one element of a `Forwarded` header (RFC 7239), if it is an address.
fn forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("for")
            .then(|| parse_hop(value.trim().trim_matches('"')))
            .flatten()
    })
}

/// An address as a hop reports it: `203.0.113.7`, `203.0.113.7:4711`, `2001:db8::1` or
/// `[2001:db8::1]:4711`. Anything else (`unknown`, obfuscated names) is none.
fn parse_hop(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        return inside.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let (host, port) = s.rsplit_once(':')?;
    if !is_port(port) {
        return None;
    }
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

fn is_port(s: &str) -> bool {
    !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit())
}

/// An IPv4-mapped IPv6 address as its IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn client(peer: &str, header: ClientIpHeader, values: &[&str], trusted: &[&str]) -> String {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header.name(), v.parse().unwrap());
        }
        client_address(peer.parse().unwrap(), &h, &nets(trusted), header).to_string()
    }

    const XFF: ClientIpHeader = ClientIpHeader::XForwardedFor;
    const FWD: ClientIpHeader = ClientIpHeader::Forwarded;

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        assert_eq!(
            client("198.51.100.9", XFF, &["203.0.113.7"], &[]),
            "198.51.100.9"
        );
        assert_eq!(
            client("198.51.100.9", XFF, &["203.0.113.7"], &["10.0.0.0/8"]),
            "198.51.100.9"
        );
    }

    #[test]
    fn trusted_hops_are_walked_right_to_left_to_the_first_untrusted_address() {
        let trusted = &["10.0.0.0/8", "fd00::/8"];
        // The client's own claim (leftmost) is never reached past an untrusted hop.
        assert_eq!(
            client(
                "10.0.0.2",
                XFF,
                &["1.1.1.1, 203.0.113.7, 10.0.0.5"],
                trusted
            ),
            "203.0.113.7"
        );
        // Several header lines are one list.
        assert_eq!(
            client(
                "10.0.0.2",
                XFF,
                &["1.1.1.1", "203.0.113.7", "10.0.0.5"],
                trusted
            ),
            "203.0.113.7"
        );
        // Every hop trusted: the leftmost.
        assert_eq!(
            client("10.0.0.2", XFF, &["10.9.9.9, 10.0.0.5"], trusted),
            "10.9.9.9"
        );
        // Ports and brackets.
        assert_eq!(
            client("10.0.0.2", XFF, &["203.0.113.7:4711"], trusted),
            "203.0.113.7"
        );
        assert_eq!(
            client("fd00::1", XFF, &["[2001:db8::1]:443"], trusted),
            "2001:db8::1"
        );
        // No header: the trusted peer itself.
        assert_eq!(client("10.0.0.2", XFF, &[], trusted), "10.0.0.2");
    }

    #[test]
    fn a_malformed_hop_ends_the_walk_at_the_last_address_known_for_sure() {
        let trusted = &["10.0.0.0/8"];
        assert_eq!(
            client(
                "10.0.0.2",
                XFF,
                &["203.0.113.7, garbage, 10.0.0.5"],
                trusted
            ),
            "10.0.0.5"
        );
        assert_eq!(client("10.0.0.2", XFF, &["unknown"], trusted), "10.0.0.2");
        assert_eq!(
            client("10.0.0.2", XFF, &["1.2.3.4:99999999"], trusted),
            "10.0.0.2"
        );
        assert_eq!(client("10.0.0.2", XFF, &["[::1"], trusted), "10.0.0.2");
    }

    #[test]
    fn forwarded_is_read_only_when_named_and_x_forwarded_for_then_ignored() {
        let trusted = &["10.0.0.0/8"];
        let both = |header| {
            let mut h = HeaderMap::new();
            h.append("x-forwarded-for", "6.6.6.6".parse().unwrap());
            h.append(
                "forwarded",
                "for=198.51.100.1;proto=https, For=\"[2001:db8::7]:80\";by=10.0.0.2"
                    .parse()
                    .unwrap(),
            );
            client_address("10.0.0.2".parse().unwrap(), &h, &nets(trusted), header).to_string()
        };
        assert_eq!(both(FWD), "2001:db8::7");
        assert_eq!(both(XFF), "6.6.6.6");
        assert_eq!(
            client("10.0.0.2", FWD, &["for=unknown, for=203.0.113.9"], trusted),
            "203.0.113.9"
        );
        assert_eq!(
            client("10.0.0.2", FWD, &["proto=https"], trusted),
            "10.0.0.2"
        );
    }

    #[test]
    fn a_line_that_is_not_text_hides_nothing_a_proxy_appended() {
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"1.2.3.4\xff, 203.0.113.7").unwrap(),
        );
        let ip = client_address("10.0.0.2".parse().unwrap(), &h, &nets(&["10.0.0.0/8"]), XFF);
        assert_eq!(ip.to_string(), "203.0.113.7");
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_ipv4() {
        assert_eq!(
            client("::ffff:10.0.0.2", XFF, &["203.0.113.7"], &["10.0.0.0/8"]),
            "203.0.113.7"
        );
        assert!(in_any(
            "::ffff:127.0.0.1".parse().unwrap(),
            &nets(&["127.0.0.0/8"])
        ));
    }
}
