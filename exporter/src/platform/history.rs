//! Who held each container IP of this host, and when, as the container runtime told it: the
//! truth a batch's local names are checked against at its cut. The eBPF map names a flow at
//! capture, and may be late (a container that connects before its start event is handled) or
//! stale (an IP handed from a stopped container to a new one before the stop is handled); the
//! history is complete through a known instant, so a flow is named from it only where it is
//! complete, and otherwise left unnamed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flowattr_common::{CanonicalIp, Timestamp};
use ipnet::IpNet;

/// The local side of a flow as the history answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalOwner {
    /// Not an address of the runtime's networks: the eBPF map's name stands.
    NotManaged,
    Owner(Arc<str>),
    Unknown(Unknown),
}

/// Why a container address is left unnamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    /// Before the watcher's first listing, or after what it has confirmed so far.
    NotYetKnown,
    /// The runtime was away, or events may have been missed, at that instant.
    RuntimeAway,
    /// No container held the address then.
    NoContainer,
    /// Two containers claimed it at once.
    Conflict,
    /// The connection outlived its container's hold on the address (a socket closed only as
    /// its namespace was torn down): naming it would claim the address past its release.
    Outlived,
    /// A port of the host's own address that a container on the host's network listened on
    /// at about that time, before the watcher confirmed it or after it stopped.
    PortUnconfirmed,
}

impl Unknown {
    pub fn as_str(self) -> &'static str {
        match self {
            Unknown::NotYetKnown => "not_yet_known",
            Unknown::RuntimeAway => "runtime_away",
            Unknown::NoContainer => "no_container",
            Unknown::Conflict => "conflict",
            Unknown::Outlived => "outlived",
            Unknown::PortUnconfirmed => "port_unconfirmed",
        }
    }
}

/// One container's hold on one address, from its attachment to the network until its
/// detachment (open while it lasts).
#[derive(Debug, Clone)]
struct Holding {
    container: Arc<str>,
    network: Arc<str>,
    workload: Arc<str>,
    from: Timestamp,
    to: Option<Timestamp>,
}

#[derive(Debug)]
pub struct IdentityHistory {
    by_ip: HashMap<CanonicalIp, Vec<Holding>>,
    /// The addresses each container holds now (its open holdings), so that a detachment looks
    /// at those alone.
    open_by_container: HashMap<Arc<str>, Vec<CanonicalIp>>,
    /// The runtime's networks' subnets, and their gateways (the host's, not a container's).
    subnets: Vec<IpNet>,
    gateways: Vec<CanonicalIp>,
    /// Everything is known from `from` through `through`, but inside `gaps`.
    from: Option<Timestamp>,
    through: Timestamp,
    gaps: Vec<(Timestamp, Timestamp)>,
    /// (host IPv4, port, from, to): a container on the host's network may have listened on the
    /// port then without the shared map saying so (before a scan found it, after it stopped).
    port_doubts: Vec<(std::net::Ipv4Addr, u16, Timestamp, Timestamp)>,
    /// How long ended holdings and gaps are kept: past this, lookups answer `NotYetKnown`.
    keep: Duration,
}

impl IdentityHistory {
    pub fn new(keep: Duration) -> IdentityHistory {
        IdentityHistory {
            by_ip: HashMap::new(),
            open_by_container: HashMap::new(),
            subnets: Vec::new(),
            gateways: Vec::new(),
            from: None,
            through: Timestamp::ZERO,
            gaps: Vec::new(),
            port_doubts: Vec::new(),
            keep,
        }
    }

    /// The runtime's networks, as listed now.
    pub fn set_networks(&mut self, subnets: Vec<IpNet>, gateways: Vec<CanonicalIp>) {
        self.subnets = subnets;
        self.gateways = gateways;
    }

    /// `container` attached to `network` at `at`, holding `ip`, named `workload`. Said again
    /// (an event read twice, a listing after an event), it changes nothing.
    pub fn attached(
        &mut self,
        container: &str,
        network: &str,
        ip: CanonicalIp,
        workload: &str,
        at: Timestamp,
    ) {
        let holdings = self.by_ip.entry(ip).or_default();
        if holdings.iter().any(|holding| {
            holding.to.is_none() && &*holding.container == container && &*holding.network == network
        }) {
            return;
        }
        let container: Arc<str> = container.into();
        holdings.push(Holding {
            container: container.clone(),
            network: network.into(),
            workload: workload.into(),
            from: at,
            to: None,
        });
        let open = self.open_by_container.entry(container).or_default();
        if !open.contains(&ip) {
            open.push(ip);
        }
    }

    /// `container` detached from `network` (or from every network, with `None`) at `at`.
    /// Returns the addresses it held.
    pub fn detached(
        &mut self,
        container: &str,
        network: Option<&str>,
        at: Timestamp,
    ) -> Vec<CanonicalIp> {
        let Some(addresses) = self.open_by_container.get_mut(container) else {
            return Vec::new();
        };
        let mut released = Vec::new();
        addresses.retain(|ip| {
            let mut still_open = false;
            for holding in self.by_ip.get_mut(ip).into_iter().flatten() {
                if holding.to.is_none() && &*holding.container == container {
                    if network.is_none_or(|network| &*holding.network == network) {
                        holding.to = Some(at.max(holding.from));
                        released.push(*ip);
                    } else {
                        still_open = true;
                    }
                }
            }
            still_open
        });
        if addresses.is_empty() {
            self.open_by_container.remove(container);
        }
        released
    }

    /// The open holdings as (container, network, address).
    pub fn open(&self) -> Vec<(Arc<str>, Arc<str>, CanonicalIp)> {
        self.by_ip
            .iter()
            .flat_map(|(ip, holdings)| {
                holdings
                    .iter()
                    .filter(|holding| holding.to.is_none())
                    .map(|holding| (holding.container.clone(), holding.network.clone(), *ip))
            })
            .collect()
    }

    /// Everything the runtime did up to `at` is known (and from `at` on, if this is the first).
    pub fn complete_through(&mut self, at: Timestamp) {
        self.from.get_or_insert(at);
        self.through = self.through.max(at);
    }

    /// What the runtime did between the last instant known complete and `until` may have been
    /// missed (the watcher lost the runtime, or events overflowed): nothing is answered inside.
    /// A watcher that keeps failing calls it again and again: the gap since the last complete
    /// instant grows, one entry however long the runtime stays away.
    pub fn missed_until(&mut self, until: Timestamp) {
        if self.from.is_none() || until <= self.through {
            return;
        }
        match self.gaps.last_mut() {
            Some((start, end)) if *start == self.through => *end = (*end).max(until),
            _ => self.gaps.push((self.through, until)),
        }
    }

    fn in_gap(&self, at: Timestamp) -> bool {
        self.gaps
            .iter()
            .any(|&(start, end)| start <= at && at <= end)
    }

    pub fn known_from(&self) -> Option<Timestamp> {
        self.from
    }

    pub fn known_through(&self) -> Option<Timestamp> {
        self.from.map(|_| self.through)
    }

    /// Who held `ip` throughout `from..=to` (a connection's lifetime, as its local side's
    /// evidence claims it): the holder at `from`, if its hold lasted past `to` and the history
    /// is complete through `to`. A hold open on both sides of a gap counts as unbroken: while
    /// the runtime is away no container changes networks.
    pub fn owner_over(&self, ip: CanonicalIp, from: Timestamp, to: Timestamp) -> LocalOwner {
        let owner = self.owner_at(ip, from);
        let LocalOwner::Owner(_) = owner else {
            return owner;
        };
        if to > self.through {
            // Past what is known: because the runtime is away (said so), or not read yet.
            let why = if self.in_gap(to) {
                Unknown::RuntimeAway
            } else {
                Unknown::NotYetKnown
            };
            return LocalOwner::Unknown(why);
        }
        let held_past = self
            .by_ip
            .get(&ip)
            .into_iter()
            .flatten()
            .any(|holding| holding.from <= from && holding.to.is_none_or(|end| to < end));
        if held_past {
            owner
        } else {
            LocalOwner::Unknown(Unknown::Outlived)
        }
    }

    /// Who held `ip` at `at`.
    pub fn owner_at(&self, ip: CanonicalIp, at: Timestamp) -> LocalOwner {
        let holdings = self.by_ip.get(&ip);
        let in_subnet = self
            .subnets
            .iter()
            .any(|subnet| subnet.contains(&ip.to_ip_addr()));
        if (holdings.is_none() && !in_subnet) || self.gateways.contains(&ip) {
            return LocalOwner::NotManaged;
        }
        if self.in_gap(at) {
            return LocalOwner::Unknown(Unknown::RuntimeAway);
        }
        match self.from {
            Some(from) if from <= at && at <= self.through => {}
            _ => return LocalOwner::Unknown(Unknown::NotYetKnown),
        }
        let mut holders = holdings
            .into_iter()
            .flatten()
            .filter(|holding| holding.from <= at && holding.to.is_none_or(|to| at < to));
        match (holders.next(), holders.next()) {
            (None, _) => LocalOwner::Unknown(Unknown::NoContainer),
            (Some(holding), None) => LocalOwner::Owner(holding.workload.clone()),
            (Some(_), Some(_)) => LocalOwner::Unknown(Unknown::Conflict),
        }
    }

    /// Between `from` and `to` a container on the host's network may have listened on `port`
    /// of `ip` while the shared map did not name it: the map's name for a flow then (the
    /// host's, or the container's after it stopped) is not trusted.
    pub fn doubt_port(
        &mut self,
        ip: std::net::Ipv4Addr,
        port: u16,
        from: Timestamp,
        to: Timestamp,
    ) {
        if from <= to {
            self.port_doubts.push((ip, port, from, to));
        }
    }

    /// Whether a flow on `port` of `ip` during `from..=to` falls in a doubt of [`Self::doubt_port`].
    pub fn port_doubted(
        &self,
        ip: std::net::Ipv4Addr,
        port: u16,
        from: Timestamp,
        to: Timestamp,
    ) -> bool {
        self.port_doubts
            .iter()
            .any(|&(doubt_ip, doubt_port, start, end)| {
                doubt_ip == ip && doubt_port == port && start <= to && from <= end
            })
    }

    /// Forgets what ended more than `keep` before `now`; lookups before then answer
    /// `NotYetKnown`.
    pub fn forget_before(&mut self, now: Timestamp) {
        let floor = now.saturating_sub(self.keep);
        for holdings in self.by_ip.values_mut() {
            holdings.retain(|holding| holding.to.is_none_or(|to| to >= floor));
        }
        self.by_ip.retain(|_, holdings| !holdings.is_empty());
        self.gaps.retain(|&(_, end)| end >= floor);
        self.port_doubts.retain(|&(_, _, _, end)| end >= floor);
        if let Some(from) = self.from.as_mut() {
            *from = (*from).max(floor);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(seconds: u64) -> Timestamp {
        Timestamp::from_nanos(seconds * 1_000_000_000)
    }

    fn ip(text: &str) -> CanonicalIp {
        CanonicalIp::from(text.parse::<std::net::IpAddr>().unwrap())
    }

    fn history() -> IdentityHistory {
        let mut history = IdentityHistory::new(Duration::from_secs(600));
        history.set_networks(
            vec!["172.18.0.0/16".parse().unwrap()],
            vec![ip("172.18.0.1")],
        );
        history
    }

    #[test]
    fn an_address_handed_from_one_container_to_another_is_named_by_the_holder_at_the_instant() {
        let mut history = history();
        history.complete_through(t(100));
        history.attached("a", "net", ip("172.18.0.2"), "api", t(110));
        history.detached("a", None, t(120));
        history.attached("b", "net", ip("172.18.0.2"), "billing", t(121));
        history.attached("b", "net", ip("172.18.0.2"), "billing", t(125));
        history.complete_through(t(130));
        let owner = |at| history.owner_at(ip("172.18.0.2"), at);
        assert_eq!(owner(t(115)), LocalOwner::Owner("api".into()));
        assert_eq!(
            owner(t(120)),
            LocalOwner::Unknown(Unknown::NoContainer),
            "detached at 120"
        );
        assert_eq!(owner(t(122)), LocalOwner::Owner("billing".into()));
        assert_eq!(
            owner(t(131)),
            LocalOwner::Unknown(Unknown::NotYetKnown),
            "past what is confirmed"
        );
        assert_eq!(
            owner(t(99)),
            LocalOwner::Unknown(Unknown::NotYetKnown),
            "before the first listing"
        );
        assert_eq!(
            history.owner_at(ip("10.0.0.9"), t(115)),
            LocalOwner::NotManaged
        );
        assert_eq!(
            history.owner_at(ip("172.18.0.1"), t(115)),
            LocalOwner::NotManaged,
            "the gateway is the host's"
        );
        assert_eq!(
            history.owner_at(ip("172.18.0.3"), t(115)),
            LocalOwner::Unknown(Unknown::NoContainer)
        );
    }

    #[test]
    fn a_doubted_port_is_doubted_for_flows_overlapping_its_window_only() {
        let mut history = history();
        let host = std::net::Ipv4Addr::new(10, 0, 2, 15);
        history.doubt_port(host, 8080, t(100), t(102));
        assert!(
            history.port_doubted(host, 8080, t(99), t(100)),
            "ends as the doubt starts"
        );
        assert!(history.port_doubted(host, 8080, t(101), t(101)));
        assert!(history.port_doubted(host, 8080, t(90), t(200)), "spans it");
        assert!(
            !history.port_doubted(host, 8080, t(103), t(110)),
            "after it"
        );
        assert!(
            !history.port_doubted(host, 8081, t(101), t(101)),
            "another port"
        );
        assert!(
            !history.port_doubted(std::net::Ipv4Addr::LOCALHOST, 8080, t(101), t(101)),
            "another address"
        );
        history.forget_before(t(102).saturating_add(Duration::from_secs(601)));
        assert!(
            !history.port_doubted(host, 8080, t(101), t(101)),
            "forgotten with the rest"
        );
    }

    #[test]
    fn gaps_and_conflicts_answer_nothing_and_old_history_is_forgotten() {
        let mut history = history();
        history.complete_through(t(100));
        history.attached("a", "net", ip("172.18.0.2"), "api", t(100));
        history.complete_through(t(110));
        history.missed_until(t(140));
        history.complete_through(t(140));
        history.attached("b", "net2", ip("172.18.0.2"), "billing", t(150));
        history.complete_through(t(160));
        let owner = |history: &IdentityHistory, at| history.owner_at(ip("172.18.0.2"), at);
        assert_eq!(owner(&history, t(105)), LocalOwner::Owner("api".into()));
        assert_eq!(
            owner(&history, t(120)),
            LocalOwner::Unknown(Unknown::RuntimeAway)
        );
        assert_eq!(
            owner(&history, t(155)),
            LocalOwner::Unknown(Unknown::Conflict)
        );
        assert_eq!(
            history.detached("a", Some("net"), t(156)),
            vec![ip("172.18.0.2")]
        );
        assert_eq!(owner(&history, t(157)), LocalOwner::Owner("billing".into()));
        assert_eq!(
            history.owner_over(ip("172.18.0.2"), t(157), t(159)),
            LocalOwner::Owner("billing".into())
        );
        assert_eq!(
            history.owner_over(ip("172.18.0.2"), t(157), t(161)),
            LocalOwner::Unknown(Unknown::NotYetKnown),
            "past what is confirmed"
        );
        history.detached("b", None, t(158));
        assert_eq!(
            history.owner_over(ip("172.18.0.2"), t(157), t(159)),
            LocalOwner::Unknown(Unknown::Outlived),
            "the connection was still open after b let the address go"
        );
        assert_eq!(
            history.owner_over(ip("172.18.0.2"), t(101), t(130)),
            LocalOwner::Owner("api".into()),
            "a hold across the gap"
        );
        history.forget_before(t(800));
        assert_eq!(
            owner(&history, t(157)),
            LocalOwner::Unknown(Unknown::NotYetKnown)
        );
        assert!(history.open().is_empty());
    }

    #[test]
    fn while_the_runtime_is_away_later_flows_say_so_and_the_gap_is_one() {
        let mut history = history();
        history.complete_through(t(100));
        history.attached("a", "net", ip("172.18.0.2"), "api", t(100));
        history.complete_through(t(110));
        // The watcher fails every second from 111 on.
        for second in 111..=130 {
            history.missed_until(t(second));
        }
        assert_eq!(history.gaps.len(), 1, "{:?}", history.gaps);
        let over = |to| history.owner_over(ip("172.18.0.2"), t(105), t(to));
        assert_eq!(over(125), LocalOwner::Unknown(Unknown::RuntimeAway));
        assert_eq!(
            over(131),
            LocalOwner::Unknown(Unknown::NotYetKnown),
            "past the last failure: not read yet"
        );
        assert_eq!(
            history.owner_at(ip("172.18.0.2"), t(120)),
            LocalOwner::Unknown(Unknown::RuntimeAway)
        );
        // Back, and listed: the gap stays what it was, and time after it is known again.
        history.missed_until(t(131));
        history.complete_through(t(131));
        history.complete_through(t(135));
        assert_eq!(
            history.owner_over(ip("172.18.0.2"), t(132), t(134)),
            LocalOwner::Owner("api".into())
        );
        assert_eq!(history.gaps.len(), 1);
    }

    #[test]
    fn a_detachment_releases_only_that_network_and_then_the_rest() {
        let mut history = IdentityHistory::new(Duration::from_secs(3600));
        history.attached("c1", "front", ip("10.0.0.2"), "web", t(100));
        history.attached("c1", "back", ip("10.1.0.2"), "web", t(100));
        history.attached("c2", "front", ip("10.0.0.3"), "db", t(100));
        assert_eq!(
            history.detached("c1", Some("back"), t(110)),
            vec![ip("10.1.0.2")]
        );
        assert_eq!(
            history.detached("c1", Some("back"), t(111)),
            Vec::new(),
            "said twice, it releases nothing"
        );
        assert_eq!(history.detached("c1", None, t(120)), vec![ip("10.0.0.2")]);
        assert_eq!(history.detached("absent", None, t(120)), Vec::new());
        let open: Vec<CanonicalIp> = history.open().into_iter().map(|(_, _, ip)| ip).collect();
        assert_eq!(open, vec![ip("10.0.0.3")]);
        // The container attaches again: its new hold is released by the next detachment.
        history.attached("c1", "front", ip("10.0.0.2"), "web", t(130));
        assert_eq!(history.detached("c1", None, t(140)), vec![ip("10.0.0.2")]);
    }
}
