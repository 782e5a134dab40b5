//! Interfaces as operators name them: an address (`198.18.0.1`, `2001:db8::1`,
//! `fe80::1%eth0`), a name (`eth0`), or — for a receiver — `auto`, the interface the kernel
//! routes toward the server.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

/// An interface as multicast needs it: IPv4 names the interface by one of its addresses,
/// IPv6 by its index; source-specific receivers are told the address packets come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    /// Its name (empty for an IPv4 address no interface here holds: the kernel then refuses
    /// it when a socket is pointed at it).
    pub name: String,
    /// Its index (0: none known; IPv6 multicast cannot use it).
    pub index: u32,
    /// The IPv4 address multicast leaves from (the one given, else its first).
    pub v4: Option<Ipv4Addr>,
    /// The IPv6 address multicast leaves from (the one given, else its first global one,
    /// else its link-local one).
    pub v6: Option<Ipv6Addr>,
    /// The address the operator named it by (`None`: by name). An address names the
    /// interface for its own family only.
    pub given: Option<IpAddr>,
}

impl Iface {
    /// The IPv4 address, or why this interface cannot carry IPv4 multicast.
    pub fn need_v4(&self, spec: &str) -> Result<Ipv4Addr, String> {
        match (self.given, self.v4) {
            (Some(IpAddr::V6(_)), _) => Err(format!(
                "{spec:?} is an IPv6 address: an IPv4 group needs an interface by name (eth0) \
                 or by an IPv4 address of it"
            )),
            (_, Some(a)) => Ok(a),
            (_, None) => Err(format!(
                "{spec:?} has no IPv4 address: an IPv4 group needs an interface with one"
            )),
        }
    }

    /// The index, or why this interface cannot carry IPv6 multicast.
    pub fn need_v6(&self, spec: &str) -> Result<u32, String> {
        match self.given {
            Some(IpAddr::V4(_)) => Err(format!(
                "{spec:?} is an IPv4 address: an IPv6 group needs an interface by name (eth0) \
                 or by an IPv6 address of it (fe80::1%eth0)"
            )),
            _ if self.index == 0 || self.v6.is_none() => Err(format!(
                "{spec:?} has no IPv6 address: an IPv6 group needs an interface with one"
            )),
            _ => Ok(self.index),
        }
    }
}

impl Iface {
    /// The loopback interface (`lo`), for both families.
    pub fn loopback() -> Iface {
        let mut i = resolve("lo").unwrap_or(Iface {
            name: "lo".into(),
            index: index_of("lo"),
            v4: Some(Ipv4Addr::LOCALHOST),
            v6: Some(Ipv6Addr::LOCALHOST),
            given: None,
        });
        i.given = None;
        i
    }

    /// How the operator named it: the address given, else the name.
    pub fn label(&self) -> String {
        self.given
            .map_or_else(|| self.name.clone(), |a| a.to_string())
    }
}

/// One address of one interface, as `getifaddrs` lists them.
struct Entry {
    name: String,
    ip: IpAddr,
}

fn entries() -> Result<Vec<Entry>, String> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("cannot list interfaces: {e}"))?;
    Ok(addrs
        .filter_map(|a| {
            let s = a.address.as_ref()?;
            let ip = if let Some(v4) = s.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else {
                IpAddr::V6(s.as_sockaddr_in6()?.ip())
            };
            Some(Entry {
                name: a.interface_name,
                ip,
            })
        })
        .collect())
}

fn index_of(name: &str) -> u32 {
    nix::net::if_::if_nametoindex(name).unwrap_or(0)
}

/// Global IPv6 addresses before link-local ones (a source-specific receiver beyond the link
/// must be told a routable source).
fn better_v6(have: Option<Ipv6Addr>, new: Ipv6Addr) -> Option<Ipv6Addr> {
    let link_local = |a: &Ipv6Addr| a.segments()[0] & 0xffc0 == 0xfe80;
    match have {
        Some(h) if !link_local(&h) || link_local(&new) => Some(h),
        _ => Some(new),
    }
}

fn by_name(name: &str, list: &[Entry]) -> Option<Iface> {
    let mut found = None::<Iface>;
    for e in list.iter().filter(|e| e.name == name) {
        let i = found.get_or_insert_with(|| Iface {
            name: name.to_string(),
            index: index_of(name),
            v4: None,
            v6: None,
            given: None,
        });
        match e.ip {
            IpAddr::V4(a) => i.v4 = i.v4.or(Some(a)),
            IpAddr::V6(a) => i.v6 = better_v6(i.v6, a),
        }
    }
    found
}

/// The interface holding `ip`, with `ip` as its address of that family.
pub fn owning(ip: IpAddr) -> Result<Iface, String> {
    let list = entries()?;
    let e = list
        .iter()
        .find(|e| e.ip == ip)
        .ok_or_else(|| format!("no interface here has address {ip}"))?;
    let mut i = by_name(&e.name, &list).expect("listed");
    i.given = Some(ip);
    match ip {
        IpAddr::V4(a) => i.v4 = Some(a),
        IpAddr::V6(a) => i.v6 = Some(a),
    }
    Ok(i)
}

/// Interface `spec`: an address (IPv6 with an optional `%scope`), or a name. The error lists
/// the interfaces there are.
pub fn resolve(spec: &str) -> Result<Iface, String> {
    let spec = spec.trim();
    if let Ok(a) = spec.parse::<Ipv4Addr>() {
        // An IPv4 address names the interface for IPv4 multicast as it is; the kernel refuses
        // one no interface holds when the socket is pointed at it.
        return Ok(owning(IpAddr::V4(a)).unwrap_or(Iface {
            name: String::new(),
            index: 0,
            v4: Some(a),
            v6: None,
            given: Some(IpAddr::V4(a)),
        }));
    }
    let (addr, scope) = match spec.split_once('%') {
        Some((a, s)) => (a, Some(s)),
        None => (spec, None),
    };
    if let Ok(a) = addr.parse::<Ipv6Addr>() {
        let mut i = owning(IpAddr::V6(a))
            .map_err(|e| format!("{spec:?}: {e} (give an address of this host, or a name)"))?;
        if let Some(s) = scope {
            let named = s.parse::<u32>().unwrap_or_else(|_| index_of(s));
            if named != i.index {
                return Err(format!("{spec:?}: {a} is on {}, not on scope {s}", i.name));
            }
        }
        i.v6 = Some(a);
        return Ok(i);
    }
    let list = entries()?;
    by_name(spec, &list).ok_or_else(|| {
        let mut names: Vec<&str> = list.iter().map(|e| e.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        format!(
            "{spec:?} is neither an address nor an interface with one (interfaces with \
             addresses here: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )
    })
}

/// The local address the kernel would send from toward `to` (no packet is sent).
pub fn route_to(to: SocketAddr) -> Result<IpAddr, String> {
    let any: SocketAddr = match to {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(any).map_err(|e| e.to_string())?;
    s.connect(to)
        .map_err(|e| format!("no route to {to}: {e}"))?;
    Ok(s.local_addr().map_err(|e| e.to_string())?.ip())
}

/// The interface the kernel routes toward `to` through (named, as `auto` is, for both
/// families).
pub fn toward(to: SocketAddr) -> Result<Iface, String> {
    let mut i = owning(route_to(to)?)?;
    i.given = None;
    Ok(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The IPv4 address an IPv4 group would use on interface `spec`.
    fn resolve_v4(spec: &str) -> Result<Ipv4Addr, String> {
        resolve(spec)?.need_v4(spec)
    }

    #[test]
    fn addresses_names_and_refusals() {
        assert_eq!(resolve_v4("198.18.0.1"), Ok(Ipv4Addr::new(198, 18, 0, 1)));
        assert_eq!(resolve_v4("lo"), Ok(Ipv4Addr::LOCALHOST));
        let e = resolve_v4("nosuch0").unwrap_err();
        assert!(
            e.contains("\"nosuch0\" is neither") && e.contains("lo"),
            "{e}"
        );
        let e = resolve("fe80::1").unwrap_err();
        assert!(e.contains("no interface here has address"), "{e}");
    }

    #[test]
    fn loopback_by_name_and_by_address_in_both_families() {
        let lo = resolve("lo").unwrap();
        assert_eq!(lo.v4, Some(Ipv4Addr::LOCALHOST));
        assert!(lo.index > 0);
        assert_eq!(resolve("127.0.0.1").unwrap().index, lo.index);
        // A plain IPv4 address names no IPv6 interface, even one that has IPv6.
        if lo.v6 == Some(Ipv6Addr::LOCALHOST) {
            assert_eq!(resolve("::1").unwrap().index, lo.index);
            assert_eq!(resolve("::1%lo").unwrap().index, lo.index);
            assert_eq!(lo.need_v6("lo"), Ok(lo.index));
            let e = resolve("::1%99999").unwrap_err();
            assert!(e.contains("not on scope"), "{e}");
        }
        let e = resolve("127.0.0.1")
            .unwrap()
            .need_v6("127.0.0.1")
            .unwrap_err();
        assert!(e.contains("is an IPv4 address"), "{e}");
    }

    #[test]
    fn the_route_to_loopback_leaves_from_loopback() {
        assert_eq!(
            route_to("127.0.0.1:7600".parse().unwrap()),
            Ok(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
        assert_eq!(
            toward("127.0.0.1:7600".parse().unwrap()).unwrap().name,
            "lo"
        );
    }
}
