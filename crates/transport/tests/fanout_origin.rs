//! The hub's fan-out and the origin a subscriber announces (READY property
//! `X-Hintfed-Origin`), over real sockets: a hub link given its owner's origin is sent every
//! message but that origin's; a link without one, and raw subscribers announcing nothing, a
//! malformed property list, an oversize, empty or non-UTF-8 origin, get everything; an origin
//! with quotes, backslashes or control characters is matched as bytes. Absence is shown by
//! order: each subscriber's next message after the expected ones is a marker published last.

mod common;

use bytes::Bytes;
use hintfed_testkit::zmtp;
use hintfed_transport::hub::HEARTBEAT_TOPIC;
use hintfed_transport::{HubBind, HubBindConfig, HubLink, HubLinkConfig, Incoming, Publication};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;

use common::{SETUP, next_fanout, next_fanouts};

/// The READY property a subscriber announces its origin with.
const ORIGIN: &[u8] = b"X-Hintfed-Origin";

async fn hub() -> HubBind {
    HubBind::bind(HubBindConfig::new("tcp://127.0.0.1:0"))
        .await
        .expect("bind")
        .0
}

async fn link(hub: &HubBind, origin: Option<&str>) -> (HubLink, mpsc::Receiver<Incoming>) {
    let mut config = HubLinkConfig::new(hub.router_endpoint());
    config.origin = origin.map(str::to_owned);
    let (link, rx) = HubLink::connect(config).expect("link");
    assert!(link.wait_connected(SETUP).await, "link connected");
    (link, rx)
}

fn msg(topic: &'static str) -> Vec<Bytes> {
    vec![
        Bytes::from_static(topic.as_bytes()),
        Bytes::from_static(b"x"),
    ]
}

/// A READY announcing `SUB` and `props`.
fn ready(props: &[(&[u8], &[u8])]) -> Vec<u8> {
    zmtp::ready_with("SUB", props)
}

/// A raw subscriber to everything whose READY command is `ready`; returns once the hub's
/// welcome heartbeat arrived (its subscription is in force).
async fn raw_sub(hub: &HubBind, ready: Vec<u8>) -> TcpStream {
    let addr = hub.pub_endpoint().trim_start_matches("tcp://").to_owned();
    let mut s = timeout(SETUP, zmtp::connect(addr, &ready, &zmtp::SUBSCRIBE_ALL))
        .await
        .expect("handshake in time")
        .expect("handshake");
    let welcome = timeout(SETUP, zmtp::read_message(&mut s))
        .await
        .expect("welcome in time")
        .expect("welcome");
    assert_eq!(welcome, [HEARTBEAT_TOPIC.as_bytes()]);
    s
}

/// The topic of the next message a raw subscriber gets, the hub's heartbeats skipped.
async fn raw_next(s: &mut TcpStream) -> Vec<u8> {
    loop {
        let mut m = timeout(SETUP, zmtp::read_message(s))
            .await
            .expect("message in time")
            .expect("message");
        if m != [HEARTBEAT_TOPIC.as_bytes()] {
            return m.swap_remove(0);
        }
    }
}

#[tokio::test]
async fn a_link_that_announced_its_origin_gets_every_message_but_its_own() {
    let hub = hub().await;
    let (_a, mut a_rx) = link(&hub, Some("pbx-a")).await;
    let (_b, mut b_rx) = link(&hub, Some("pbx-b")).await;
    let (_plain, mut plain_rx) = link(&hub, None).await;
    let batch = [
        Publication::of("pbx-a", msg("state.a")),
        Publication::of("pbx-b", msg("state.b")),
        Publication::new(msg("control.hub")),
        Publication::of("pbx-c", msg("state.c")),
    ];
    hub.publish_batch(&batch).await.expect("publish");
    // One at a time too, and a marker of no origin last.
    hub.publish_batch(&[Publication::of("pbx-a", msg("state.a2"))])
        .await
        .expect("publish");
    hub.publish(msg("marker")).await.expect("publish");
    let cases: [(&str, _, &[&'static str]); 3] = [
        (
            "pbx-a",
            &mut a_rx,
            &["state.b", "control.hub", "state.c", "marker"],
        ),
        (
            "pbx-b",
            &mut b_rx,
            &["state.a", "control.hub", "state.c", "state.a2", "marker"],
        ),
        (
            "no origin announced",
            &mut plain_rx,
            &[
                "state.a",
                "state.b",
                "control.hub",
                "state.c",
                "state.a2",
                "marker",
            ],
        ),
    ];
    for (who, rx, topics) in cases {
        let want: Vec<_> = topics.iter().map(|t| msg(t)).collect();
        assert_eq!(next_fanouts(rx, want.len()).await, want, "{who}");
    }
}

#[tokio::test]
async fn hostile_or_odd_origin_announcements_never_hurt_the_hub_nor_other_subscribers() {
    let hub = hub().await;
    // A READY whose property list (after a good Socket-Type) ends in `tail`.
    let malformed = |tail: &[u8]| {
        let mut r = ready(&[]);
        r.extend_from_slice(tail);
        r[1] = u8::try_from(r.len() - 2).expect("short command");
        r
    };
    // Oversize (past 255 bytes, in a 60 KiB READY), empty, non-UTF-8, malformed (a value
    // length running past the end, a name cut short), none: everything is sent.
    let oversize = vec![b'a'; 60 * 1024];
    let mut everything = Vec::new();
    for (what, r) in [
        ("oversize", ready(&[(ORIGIN, &oversize)])),
        ("empty", ready(&[(ORIGIN, b"")])),
        ("not UTF-8", ready(&[(ORIGIN, b"pbx-a\xff")])),
        (
            "value past the end",
            malformed(b"\x10X-Hintfed-Origin\x00\x00\x10\x00pbx-a"),
        ),
        ("name cut short", malformed(b"\x40X-Hint")),
        ("none", ready(&[])),
    ] {
        everything.push((what, raw_sub(&hub, r).await));
    }
    // Quotes, a backslash, control characters, non-ASCII, the property name in another case:
    // compared as bytes, that origin's messages are not sent.
    let odd = "pbx \"q\" \\ \u{0}\u{1} é";
    let mut odd_sub = raw_sub(&hub, ready(&[(b"x-HINTFED-origin", odd.as_bytes())])).await;
    let batch = [
        Publication::of("pbx-a", msg("state.a")),
        Publication::of(odd, msg("state.odd")),
        Publication::new(msg("marker")),
    ];
    hub.publish_batch(&batch).await.expect("publish");
    for (what, s) in &mut everything {
        for want in ["state.a", "state.odd", "marker"] {
            assert_eq!(raw_next(s).await, want.as_bytes(), "{what}");
        }
    }
    assert_eq!(raw_next(&mut odd_sub).await, b"state.a");
    assert_eq!(raw_next(&mut odd_sub).await, b"marker");
    // The hub still serves links.
    let (_l, mut rx) = link(&hub, Some("pbx-a")).await;
    hub.publish_batch(&[
        Publication::of("pbx-a", msg("state.a")),
        Publication::new(msg("after")),
    ])
    .await
    .expect("publish");
    assert_eq!(next_fanout(&mut rx).await, msg("after"));
}
