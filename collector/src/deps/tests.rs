use std::net::Ipv4Addr;

use super::*;

fn ip(last: u8) -> CanonicalIp {
    CanonicalIp::from(Ipv4Addr::new(10, 0, 0, last))
}

/// The report of a connection client 10.0.0.1:40000 -> server 10.0.0.2:443 by one end.
fn report(
    direction: Direction,
    state: FlowState,
    start_s: u64,
    end_s: u64,
    bytes: u64,
) -> ConnectionReport {
    let (client, server) = ((ip(1), 40_000), (ip(2), 443));
    let ((local_ip, local_port), (remote_ip, remote_port)) = match direction {
        Direction::Outbound => (client, server),
        Direction::Inbound => (server, client),
    };
    ConnectionReport {
        local_ip,
        local_port,
        remote_ip,
        remote_port,
        start: Timestamp::from_nanos(start_s * 1_000_000_000),
        end: Timestamp::from_nanos(end_s * 1_000_000_000),
        state,
        direction,
        bytes,
        local: None,
        remote: RemoteEnd::Unattributed(Reason::NoEvidence),
    }
}

#[test]
fn a_long_connection_reported_by_both_ends_is_one_edge_counted_once() {
    let mut names = WorkloadInterner::default();
    let (api, db) = (names.intern("api"), names.intern("db"));
    let mut client_shard = DependencyCounter::default();
    let mut server_shard = DependencyCounter::default();
    let both = |mut report: ConnectionReport| {
        let (local, remote) = match report.direction {
            Direction::Outbound => (api, db),
            Direction::Inbound => (db, api),
        };
        report.local = Some(local);
        report.remote = RemoteEnd::Workload(remote);
        report
    };
    // Open reports every minute for a day, then the close with all the bytes, from each
    // end.
    for minute in 1..=1440 {
        client_shard.record(&both(report(
            Direction::Outbound,
            FlowState::Open,
            100,
            100 + minute * 60,
            0,
        )));
        server_shard.record(&both(report(
            Direction::Inbound,
            FlowState::Open,
            100,
            100 + minute * 60,
            0,
        )));
    }
    assert_eq!(client_shard.open_connections(), 1);
    client_shard.record(&both(report(
        Direction::Outbound,
        FlowState::Closed,
        100,
        90_000,
        5_000,
    )));
    server_shard.record(&both(report(
        Direction::Inbound,
        FlowState::Closed,
        100,
        90_000,
        5_000,
    )));
    assert_eq!(client_shard.open_connections(), 0);
    let edges = merge([
        client_shard.snapshot(&names, Window::All),
        server_shard.snapshot(&names, Window::All),
    ]);
    assert_eq!(edges.len(), 1);
    assert_eq!(
        (
            edges[0].client.as_str(),
            edges[0].server.as_str(),
            edges[0].attributed
        ),
        ("api", "db", true)
    );
    assert_eq!(
        edges[0].count,
        EdgeCount {
            connections: 1,
            flows: 1441,
            bytes: 5_000
        }
    );
    // The one connection is its sample, client first, as the report that counted it saw it.
    assert_eq!(edges[0].samples.len(), 1);
    assert_eq!(
        edges[0].samples[0].client,
        "10.0.0.1:40000".parse::<std::net::SocketAddr>().unwrap()
    );
    assert_eq!(
        edges[0].samples[0].server,
        "10.0.0.2:443".parse::<std::net::SocketAddr>().unwrap()
    );
    assert_eq!(edges[0].samples[0].state, "open");
    assert!(to_dot(&edges).contains(r#""api" -> "db" [label="1"];"#));
}

#[test]
fn the_server_speaks_only_for_clients_no_exporter_reported() {
    let mut names = WorkloadInterner::default();
    let web = names.intern("w\"eb");
    let mut counter = DependencyCounter::default();
    // A client with no agent (a load balancer): only the server reports the connection.
    let mut inbound = report(Direction::Inbound, FlowState::Closed, 10, 11, 700);
    inbound.local = Some(web);
    counter.record(&inbound);
    // A client whose evidence conflicts has an exporter: its own report speaks.
    inbound.remote = RemoteEnd::Unattributed(Reason::Conflict);
    counter.record(&inbound);
    // An unnamed client host calling a named server: the server's report speaks for it,
    // the client's own report does not.
    let mut outbound = report(Direction::Outbound, FlowState::Closed, 20, 21, 50);
    outbound.remote = RemoteEnd::Workload(web);
    counter.record(&outbound);
    // The same connection as the server reported it: the client's evidence is unnamed.
    let mut unnamed_client = report(Direction::Inbound, FlowState::Closed, 20, 21, 50);
    unnamed_client.local = Some(web);
    unnamed_client.remote = RemoteEnd::Unattributed(Reason::Unnamed);
    counter.record(&unnamed_client);
    let mut edges = merge([counter.snapshot(&names, Window::All)]);
    assert_eq!(edges.len(), 2, "{edges:?}");
    let unnamed = edges
        .iter()
        .position(|edge| edge.client == "unattributed:unnamed")
        .expect("the unnamed client's edge");
    assert_eq!(
        (
            edges[unnamed].server.as_str(),
            edges[unnamed].count.connections
        ),
        ("w\"eb", 1)
    );
    edges.remove(unnamed);
    assert_eq!(edges[0].client, "unattributed:no_evidence");
    assert_eq!(edges[0].server, "w\"eb");
    assert_eq!(
        edges[0].count,
        EdgeCount {
            connections: 1,
            flows: 1,
            bytes: 700
        }
    );
    assert!(
        to_dot(&edges)
            .contains(r#""unattributed:no_evidence" -> "w\"eb" [label="1", style=dashed];"#)
    );
}

#[test]
fn a_reused_four_tuple_is_a_new_connection_and_idle_ones_are_forgotten() {
    let names = WorkloadInterner::default();
    let mut counter = DependencyCounter::default();
    counter.record(&report(Direction::Outbound, FlowState::Open, 100, 160, 0));
    // The same 4-tuple starting minutes later is another connection (its close was lost).
    counter.record(&report(Direction::Outbound, FlowState::Open, 400, 460, 0));
    counter.record(&report(
        Direction::Outbound,
        FlowState::Closed,
        400,
        500,
        10,
    ));
    assert_eq!(
        merge([counter.snapshot(&names, Window::All)])[0]
            .count
            .connections,
        2
    );
    counter.record(&report(Direction::Outbound, FlowState::Open, 600, 660, 0));
    counter.forget_idle(Timestamp::from_nanos(661_000_000_000));
    assert_eq!(counter.open_connections(), 0);
}

fn minute(m: u64) -> Timestamp {
    Timestamp::from_nanos(m * minutes::MINUTE_NANOS)
}

/// A closed connection api -> db active in minute `m` (seconds into it: `second`).
fn closed_in(names: &mut WorkloadInterner, m: u64, second: u64, port: u16) -> ConnectionReport {
    let mut report = report(Direction::Outbound, FlowState::Closed, 0, 0, 10);
    report.start = Timestamp::from_nanos(m * minutes::MINUTE_NANOS + second * 1_000_000_000);
    report.end = report.start;
    report.local_port = port;
    report.local = Some(names.intern("api"));
    report.remote = RemoteEnd::Workload(names.intern("db"));
    report
}

#[test]
fn a_window_counts_the_minutes_it_covers_and_the_whole_history_never_shrinks() {
    let mut names = WorkloadInterner::default();
    let mut counter = DependencyCounter::default();
    // One connection in each of minutes 1000..1100 (more than the retained hour), one more in
    // minute 1099, and one arriving late for minute 1050 after the rest.
    for m in 1000..1100 {
        let report = closed_in(&mut names, m, 5, 40_000 + m as u16);
        counter.record(&report);
    }
    let report = closed_in(&mut names, 1099, 30, 50_000);
    counter.record(&report);
    let late = closed_in(&mut names, 1050, 1, 50_001);
    counter.record(&late);
    let connections = |window: Window| {
        merge([counter.snapshot(&names, window)])
            .first()
            .map_or(0, |edge| edge.count.connections)
    };
    assert_eq!(connections(Window::All), 102);
    // The last 15 minutes: 1085..1100, 15 minutes plus the second connection of 1099.
    assert_eq!(connections(Window::between(minute(1085), minute(1100))), 16);
    // A window inside one minute covers that minute.
    let inside = Window::between(
        Timestamp::from_nanos(minute(1050).as_nanos() + 1),
        Timestamp::from_nanos(minute(1050).as_nanos() + 2),
    );
    assert_eq!(connections(inside), 2);
    // Folded minutes (before 1040) answer only the whole history.
    assert_eq!(connections(Window::between(minute(1000), minute(1040))), 0);
    // Samples: newest first, at most SAMPLES_LISTED, from the window's minutes.
    let edges = merge([counter.snapshot(&names, Window::between(minute(1098), minute(1100)))]);
    let ports: Vec<u16> = edges[0].samples.iter().map(|s| s.client.port()).collect();
    assert_eq!(ports, vec![50_000, 40_000 + 1099, 40_000 + 1098]);
}

#[test]
fn a_report_older_than_the_retained_hour_counts_in_the_whole_history() {
    let mut names = WorkloadInterner::default();
    let mut counter = DependencyCounter::default();
    let now = closed_in(&mut names, 5000, 0, 1);
    counter.record(&now);
    let old = closed_in(&mut names, 5000 - RETAINED_MINUTES - 3, 0, 2);
    counter.record(&old);
    let window = Window::between(minute(4000), minute(5001));
    assert_eq!(
        merge([counter.snapshot(&names, window)])[0]
            .count
            .connections,
        1
    );
    assert_eq!(
        merge([counter.snapshot(&names, Window::All)])[0]
            .count
            .connections,
        2
    );
}
