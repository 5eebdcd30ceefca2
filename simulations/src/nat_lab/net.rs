//! The lab's network: Linux network namespaces joined by veth pairs, with NAT routers made of
//! iptables rules.
//!
//! ```text
//!                        mmlab-net: bridge br0, 10.99.0.1/24, the "internet";
//!                        the public micromesh nodes listen on 10.99.0.1
//!        ┌──────────────────┬───────┴──────────┬───────────────────────┐
//!   none host           home/full-cone/      CGNAT carrier router   (one per kind and side)
//!   10.99.0.N           corporate router     wan 10.99.0.N
//!                       wan 10.99.0.N        inner 100.64.N.1/24
//!                       lan 10.99.N.1/24       │
//!                         │                  home router wan 100.64.N.2, lan 10.99.N.1/24
//!                       host 10.99.N.2         │
//!                                            host 10.99.N.2
//! ```
//!
//! The internet routes every private network to its router, so only the routers' NAT and
//! filter rules keep hosts apart, as on the real internet. Each kind, as other NAT labs name
//! them:
//!
//! - none: a public address;
//! - home: endpoint-independent mapping that keeps the port (`MASQUERADE`), address-and-port
//!   dependent filtering (inbound only for established flows);
//! - full cone: the same mapping, endpoint-independent filtering (every inbound packet to the
//!   router is forwarded to its one host, `DNAT`);
//! - corporate: endpoint-dependent mapping with random ports (`MASQUERADE --random-fully`),
//!   filtering as home: a symmetric NAT;
//! - CGNAT: a home NAT behind a carrier's NAT (in 100.64.0.0/10), both home-like.
//!
//! Routers drop unsolicited packets silently, as home routers do (an answer, a RST or an ICMP
//! error, would leave a conntrack entry that moves the host's next mapping to another port).
//! Every namespace is named `mmlab-…`; the lab deletes only those, and deletes leftovers of an
//! earlier run with the same names first.

use std::process::Command;

use serde::Serialize;

/// The prefix of every namespace the lab makes.
pub(crate) const PREFIX: &str = "mmlab-";
/// The namespace playing the internet.
pub(crate) const INTERNET: &str = "mmlab-net";
/// The address of the internet's bridge, where the public micromesh nodes listen.
pub(crate) const PUBLIC_IP: &str = "10.99.0.1";

/// A kind of NAT in front of a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Kind {
    None,
    Home,
    FullCone,
    Corporate,
    Cgnat,
}

impl Kind {
    pub(crate) const ALL: [Kind; 5] = [
        Kind::None,
        Kind::Home,
        Kind::FullCone,
        Kind::Corporate,
        Kind::Cgnat,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::None => "none",
            Kind::Home => "home",
            Kind::FullCone => "full-cone",
            Kind::Corporate => "corporate",
            Kind::Cgnat => "cgnat",
        }
    }

    pub(crate) fn parse(name: &str) -> Result<Kind, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown NAT kind {name:?} (one of {})", names.join(", "))
            })
    }

    /// Whether the NAT maps a host's port to the same outside port whoever it sends to.
    fn endpoint_independent_mapping(self) -> bool {
        self != Kind::Corporate
    }

    /// Whether anyone may send to a host once it has a mapping (or, without a NAT, at all).
    fn endpoint_independent_filtering(self) -> bool {
        matches!(self, Kind::None | Kind::FullCone)
    }

    /// Whether two hosts behind these NATs can have a direct connection: one side lets anyone
    /// in, or both keep their mappings whoever they send to, so that each side's hole-punching
    /// packets reach the mapping the other side learnt. (Between a symmetric NAT and a NAT that
    /// filters by address and port, that takes guessing the symmetric NAT's next port, which
    /// micromesh does not do, nor does libp2p's DCUtR.)
    pub(crate) fn direct_possible(a: Kind, b: Kind) -> bool {
        a.endpoint_independent_filtering()
            || b.endpoint_independent_filtering()
            || (a.endpoint_independent_mapping() && b.endpoint_independent_mapping())
    }
}

/// A host of the lab: the namespace a micromesh node runs in.
#[derive(Clone, Debug)]
pub(crate) struct Host {
    pub(crate) kind: Kind,
    pub(crate) namespace: String,
}

/// The namespaces of a lab; dropping it deletes them.
pub(crate) struct Lab {
    namespaces: Vec<String>,
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program).args(args).output().map_err(|e| {
        format!("cannot run {program}: {e} (the NAT lab needs iproute2 and iptables)")
    })?;
    if !output.status.success() {
        return Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `ip` with `args`.
fn ip(args: &[&str]) -> Result<String, String> {
    run("ip", args)
}

/// Runs `program` inside namespace `ns`.
fn inside(ns: &str, program: &str, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    ip(&all)
}

fn iptables(ns: &str, rule: &str) -> Result<(), String> {
    let args: Vec<&str> = rule.split_whitespace().collect();
    inside(ns, "iptables", &args).map(drop)
}

impl Lab {
    /// Builds the internet and, for every kind in `kinds` and every side in `sides`, a host
    /// behind a NAT of that kind. Returns the hosts in the order asked, kind by kind.
    pub(crate) fn build(kinds: &[Kind], sides: &[&str]) -> Result<(Lab, Vec<Vec<Host>>), String> {
        run("iptables", &["--version"])?;
        for ns in ip(&["netns", "list"])?.lines() {
            let name = ns.split_whitespace().next().unwrap_or_default();
            if name.starts_with(PREFIX) {
                ip(&["netns", "del", name])?;
            }
        }
        let mut lab = Lab {
            namespaces: Vec::new(),
        };
        lab.namespace(INTERNET)?;
        ip(&["-n", INTERNET, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", INTERNET, "link", "set", "br0", "up"])?;
        let public = format!("{PUBLIC_IP}/24");
        ip(&["-n", INTERNET, "addr", "add", &public, "dev", "br0"])?;
        forward(INTERNET)?;
        let mut hosts = Vec::new();
        let mut index = 10u8;
        for &kind in kinds {
            let mut of_kind = Vec::new();
            for side in sides {
                let namespace = format!("{PREFIX}{}-{side}", kind.name());
                lab.host(kind, &namespace, index)?;
                of_kind.push(Host { kind, namespace });
                index += 1;
            }
            hosts.push(of_kind);
        }
        Ok((lab, hosts))
    }

    fn namespace(&mut self, name: &str) -> Result<(), String> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// A veth pair between two namespaces, each end with an address (or none) and up.
    fn link(a: (&str, &str, Option<&str>), b: (&str, &str, Option<&str>)) -> Result<(), String> {
        ip(&[
            "-n", a.0, "link", "add", a.1, "type", "veth", "peer", "name", b.1, "netns", b.0,
        ])?;
        for (ns, dev, addr) in [a, b] {
            if let Some(addr) = addr {
                ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            }
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(())
    }

    /// Plugs `ns`'s interface `dev` into the internet's bridge as port `p<index>`, with address
    /// 10.99.0.`index`.
    fn plug(ns: &str, dev: &str, index: u8) -> Result<(), String> {
        let port = format!("p{index}");
        let addr = format!("10.99.0.{index}/24");
        Self::link((INTERNET, &port, None), (ns, dev, Some(&addr)))?;
        ip(&["-n", INTERNET, "link", "set", &port, "master", "br0"])?;
        Ok(())
    }

    fn host(&mut self, kind: Kind, host: &str, index: u8) -> Result<(), String> {
        self.namespace(host)?;
        let router_wan = format!("10.99.0.{index}");
        let lan = format!("10.99.{index}.0/24");
        let lan_gateway = format!("10.99.{index}.1");
        let host_ip = format!("10.99.{index}.2");
        if kind == Kind::None {
            Self::plug(host, "eth0", index)?;
            ip(&["-n", host, "route", "add", "default", "via", PUBLIC_IP])?;
            return Ok(());
        }
        let router = format!("{host}-nat");
        self.namespace(&router)?;
        if kind == Kind::Cgnat {
            // The carrier's router on the internet, the home router behind it.
            let carrier = format!("{host}-cgn");
            self.namespace(&carrier)?;
            Self::plug(&carrier, "wan", index)?;
            let inner = format!("100.64.{index}.0/24");
            let carrier_inner = format!("100.64.{index}.1");
            let home_wan = format!("100.64.{index}.2");
            Self::link(
                (&carrier, "lan", Some(&format!("{carrier_inner}/24"))),
                (&router, "wan", Some(&format!("{home_wan}/24"))),
            )?;
            ip(&["-n", &carrier, "route", "add", "default", "via", PUBLIC_IP])?;
            ip(&["-n", &carrier, "route", "add", &lan, "via", &home_wan])?;
            ip(&[
                "-n",
                &router,
                "route",
                "add",
                "default",
                "via",
                &carrier_inner,
            ])?;
            ip(&["-n", INTERNET, "route", "add", &inner, "via", &router_wan])?;
            forward(&carrier)?;
            masquerade(&carrier, "")?;
            filter_unsolicited(&carrier)?;
        } else {
            Self::plug(&router, "wan", index)?;
            ip(&["-n", &router, "route", "add", "default", "via", PUBLIC_IP])?;
        }
        Self::link(
            (&router, "lan", Some(&format!("{lan_gateway}/24"))),
            (host, "eth0", Some(&format!("{host_ip}/24"))),
        )?;
        ip(&["-n", host, "route", "add", "default", "via", &lan_gateway])?;
        ip(&["-n", INTERNET, "route", "add", &lan, "via", &router_wan])?;
        forward(&router)?;
        match kind {
            Kind::Home | Kind::Cgnat => {
                masquerade(&router, "")?;
                filter_unsolicited(&router)?;
            }
            Kind::Corporate => {
                masquerade(&router, "--random-fully")?;
                filter_unsolicited(&router)?;
            }
            Kind::FullCone => {
                masquerade(&router, "")?;
                // New flows from outside to the router go to the host, whoever sends them;
                // replies to the host's own flows follow their conntrack entries as ever.
                // Nothing else gets in: not a packet for the host's own private address.
                iptables(
                    &router,
                    &format!(
                        "-t nat -A PREROUTING -i wan -d {router_wan} -j DNAT --to-destination {host_ip}"
                    ),
                )?;
                for rule in [
                    "-A FORWARD -i wan -m conntrack --ctstate DNAT,ESTABLISHED,RELATED -j ACCEPT",
                    "-A FORWARD -i wan -j DROP",
                ] {
                    iptables(&router, rule)?;
                }
            }
            Kind::None => unreachable!("handled above"),
        }
        Ok(())
    }

    /// Deletes every namespace of the lab; their interfaces and rules go with them.
    pub(crate) fn down(&mut self) {
        for ns in self.namespaces.drain(..).rev() {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("nat-lab: {e}");
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.down();
    }
}

fn forward(ns: &str) -> Result<(), String> {
    inside(ns, "sh", &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]).map(drop)
}

fn masquerade(router: &str, options: &str) -> Result<(), String> {
    iptables(
        router,
        &format!("-t nat -A POSTROUTING -o wan -j MASQUERADE {options}"),
    )
}

/// Lets in from the outside only what belongs to flows the inside started, and drops the rest
/// without an answer.
fn filter_unsolicited(router: &str) -> Result<(), String> {
    for rule in [
        "-A FORWARD -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A FORWARD -i wan -j DROP",
        "-A INPUT -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A INPUT -i wan -j DROP",
    ] {
        iptables(router, rule)?;
    }
    Ok(())
}

/// Sends what namespace `ns` receives on `device` through NFQUEUE `queue`, where a delayer
/// holds it; packets pass as ever when nothing listens on the queue.
pub(crate) fn delay_ingress(ns: &str, device: &str, queue: u16) -> Result<(), String> {
    iptables(
        ns,
        &format!("-A INPUT -i {device} -j NFQUEUE --queue-num {queue} --queue-bypass"),
    )
}

/// The command that runs `program` with `args` inside namespace `ns`.
pub(crate) fn command_in(ns: &str, program: &std::path::Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new("ip");
    command.args(["netns", "exec", ns]).arg(program);
    command
}
