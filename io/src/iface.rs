//! Interfaces as operators name them: an address (`198.18.0.1`), a name (`eth0`), or — for a
//! receiver — `auto`, the interface the kernel routes toward the server.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};

/// The IPv4 address of interface `spec`: an address as is, else the first IPv4 address of the
/// interface of that name. The error lists the interfaces there are.
pub fn resolve_v4(spec: &str) -> Result<Ipv4Addr, String> {
    let spec = spec.trim();
    if let Ok(a) = spec.parse::<Ipv4Addr>() {
        return Ok(a);
    }
    if spec.parse::<IpAddr>().is_ok() {
        return Err(format!(
            "{spec:?} is an IPv6 address: multicast here is IPv4 (give the interface's IPv4 \
             address or its name)"
        ));
    }
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("cannot list interfaces: {e}"))?;
    let mut names = Vec::new();
    for a in addrs {
        let v4 = a
            .address
            .as_ref()
            .and_then(|s| s.as_sockaddr_in())
            .map(|s| s.ip());
        if a.interface_name == spec {
            if let Some(ip) = v4 {
                return Ok(ip);
            }
        }
        if v4.is_some() && !names.contains(&a.interface_name) {
            names.push(a.interface_name);
        }
    }
    Err(format!(
        "{spec:?} is neither an IPv4 address nor an interface with one (interfaces with IPv4 \
         addresses here: {})",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    ))
}

/// The local IPv4 address the kernel would send from toward `to` (no packet is sent).
pub fn route_to(to: SocketAddr) -> Result<Ipv4Addr, String> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| e.to_string())?;
    s.connect(to)
        .map_err(|e| format!("no route to {to}: {e}"))?;
    match s.local_addr().map_err(|e| e.to_string())?.ip() {
        IpAddr::V4(a) => Ok(a),
        IpAddr::V6(a) => Err(format!("the route to {to} leaves from IPv6 address {a}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_names_and_refusals() {
        assert_eq!(resolve_v4("198.18.0.1"), Ok(Ipv4Addr::new(198, 18, 0, 1)));
        assert_eq!(resolve_v4("lo"), Ok(Ipv4Addr::LOCALHOST));
        let e = resolve_v4("nosuch0").unwrap_err();
        assert!(
            e.contains("\"nosuch0\" is neither") && e.contains("lo"),
            "{e}"
        );
        let e = resolve_v4("fe80::1").unwrap_err();
        assert!(e.contains("IPv6"), "{e}");
    }

    #[test]
    fn the_route_to_loopback_leaves_from_loopback() {
        assert_eq!(
            route_to("127.0.0.1:7600".parse().unwrap()),
            Ok(Ipv4Addr::LOCALHOST)
        );
    }
}
