//! The loopback DNS server of `support::dns`, checked with hickory-resolver:
//! what DNS discovery tests rely on it for.
#![cfg(feature = "dns")]

mod support;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::{ResolveError, TokioResolver};

use support::dns::TestDns;

const TIMEOUT: Duration = Duration::from_millis(300);

/// A resolver that asks only `dns`, caches nothing and tries once, so each
/// lookup is one query that sees the records as they are now.
fn resolver(dns: &TestDns) -> TokioResolver {
    let servers = NameServerConfigGroup::from_ips_clear(&[dns.addr.ip()], dns.addr.port(), true);
    let config = ResolverConfig::from_parts(None, vec![], servers);
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    // Retries after the first try: 0 is a single query.
    opts.attempts = 0;
    opts.timeout = TIMEOUT;
    TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
        .with_options(opts)
        .build()
}

/// The response code of a "no records" answer, `None` for any other error.
fn no_records_code(err: &ResolveError) -> Option<ResponseCode> {
    match err.proto()?.kind() {
        ProtoErrorKind::NoRecordsFound { response_code, .. } => Some(*response_code),
        _ => None,
    }
}

fn ips(lookup: &hickory_resolver::lookup::Ipv4Lookup) -> Vec<Ipv4Addr> {
    let mut ips: Vec<Ipv4Addr> = lookup.iter().map(|a| a.0).collect();
    ips.sort();
    ips
}

#[tokio::test]
async fn a_records_are_served_with_their_ttl_and_changes_show_at_once() {
    let dns = TestDns::start("test.").await;
    let resolver = resolver(&dns);
    let (one, two, three) = (
        Ipv4Addr::new(127, 0, 0, 2),
        Ipv4Addr::new(127, 0, 0, 3),
        Ipv4Addr::new(127, 0, 0, 4),
    );

    dns.set_a("api.test.", &[one, two], 30).await;
    let lookup = resolver.ipv4_lookup("api.test.").await.expect("A lookup");
    assert_eq!(ips(&lookup), vec![one, two]);
    for record in lookup.as_lookup().records() {
        assert!(
            (29..=30).contains(&record.ttl()),
            "ttl {} for a record set with 30",
            record.ttl()
        );
    }
    assert_eq!(dns.queries(), 1);

    dns.set_a("api.test.", &[three], 5).await;
    let lookup = resolver.ipv4_lookup("api.test.").await.expect("A lookup");
    assert_eq!(ips(&lookup), vec![three]);
    assert!(lookup.as_lookup().records().iter().all(|r| r.ttl() <= 5));
    assert_eq!(dns.queries(), 2);

    let v6 = Ipv6Addr::LOCALHOST;
    dns.set_aaaa("api.test.", &[v6], 7).await;
    let lookup = resolver
        .ipv6_lookup("api.test.")
        .await
        .expect("AAAA lookup");
    assert_eq!(lookup.iter().map(|a| a.0).collect::<Vec<_>>(), vec![v6]);
    // The A records are untouched by setting AAAA.
    let lookup = resolver.ipv4_lookup("api.test.").await.expect("A lookup");
    assert_eq!(ips(&lookup), vec![three]);
}

#[tokio::test]
async fn srv_records_carry_priority_weight_port_and_target() {
    let dns = TestDns::start("test.").await;
    let resolver = resolver(&dns);
    dns.set_srv(
        "_http._tcp.api.test.",
        &[(10, 5, 8080, "a.api.test."), (20, 1, 8081, "b.api.test")],
        60,
    )
    .await;

    let lookup = resolver
        .srv_lookup("_http._tcp.api.test.")
        .await
        .expect("SRV lookup");
    let mut records: Vec<(u16, u16, u16, String)> = lookup
        .iter()
        .map(|srv| {
            (
                srv.priority(),
                srv.weight(),
                srv.port(),
                srv.target().to_string(),
            )
        })
        .collect();
    records.sort();
    assert_eq!(
        records,
        vec![
            (10, 5, 8080, "a.api.test.".to_owned()),
            (20, 1, 8081, "b.api.test.".to_owned()),
        ]
    );
    assert!(lookup.as_lookup().records().iter().all(|r| r.ttl() <= 60));
}

#[tokio::test]
async fn a_removed_name_is_nxdomain_and_a_missing_type_is_no_data() {
    let dns = TestDns::start("test.").await;
    let resolver = resolver(&dns);

    // Never set: NXDOMAIN.
    let err = resolver
        .ipv4_lookup("gone.test.")
        .await
        .expect_err("no such name");
    assert!(err.is_no_records_found() && err.is_nx_domain(), "{err:?}");
    assert_eq!(no_records_code(&err), Some(ResponseCode::NXDomain));

    // Set, then emptied: NXDOMAIN again.
    dns.set_a("api.test.", &[Ipv4Addr::new(127, 0, 0, 2)], 30)
        .await;
    resolver.ipv4_lookup("api.test.").await.expect("A lookup");
    dns.set_a("api.test.", &[], 30).await;
    let err = resolver
        .ipv4_lookup("api.test.")
        .await
        .expect_err("removed");
    assert!(err.is_nx_domain(), "{err:?}");

    // The name has AAAA but no A: "no data", NOERROR with no answer.
    dns.set_aaaa("api.test.", &[Ipv6Addr::LOCALHOST], 30).await;
    let err = resolver
        .ipv4_lookup("api.test.")
        .await
        .expect_err("no A records");
    assert!(err.is_no_records_found() && !err.is_nx_domain(), "{err:?}");
    assert_eq!(no_records_code(&err), Some(ResponseCode::NoError));
}

#[tokio::test]
async fn failing_answers_servfail_and_stop_times_out_until_resumed() {
    let dns = TestDns::start("test.").await;
    let resolver = resolver(&dns);
    let ip = Ipv4Addr::new(127, 0, 0, 2);
    dns.set_a("api.test.", &[ip], 30).await;

    // SERVFAIL comes back as "no records found" with that response code:
    // `is_no_records_found()` alone cannot tell it from a removed name.
    dns.set_failing(true);
    let err = resolver
        .ipv4_lookup("api.test.")
        .await
        .expect_err("SERVFAIL");
    assert!(err.is_no_records_found() && !err.is_nx_domain(), "{err:?}");
    assert_eq!(no_records_code(&err), Some(ResponseCode::ServFail));
    dns.set_failing(false);
    let lookup = resolver.ipv4_lookup("api.test.").await.expect("A lookup");
    assert_eq!(ips(&lookup), vec![ip]);

    // Stopped: nothing answers, and the lookup times out.
    dns.stop();
    let before = dns.queries();
    let started = tokio::time::Instant::now();
    let err = resolver
        .ipv4_lookup("api.test.")
        .await
        .expect_err("no server");
    assert!(
        matches!(err.proto().map(|e| e.kind()), Some(ProtoErrorKind::Timeout)),
        "{err:?}"
    );
    assert!(started.elapsed() >= TIMEOUT);
    assert_eq!(dns.queries(), before);

    // Back on the same port, records as they were.
    dns.resume().await;
    let lookup = resolver.ipv4_lookup("api.test.").await.expect("A lookup");
    assert_eq!(ips(&lookup), vec![ip]);
}
