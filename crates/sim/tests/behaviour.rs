//! Simulator behaviour beyond the captures: masks, admin actions, load, robustness, several
//! servers in one process.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hintfed_ami::Message;
use hintfed_sim::{DeviceState, RandomLoad, ScriptLine, ScriptStep, SimConfig};
use hintfed_testkit::wait::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn setvar(var: &str, value: &str) -> Message {
    Message::action("Setvar")
        .with("Variable", var)
        .with("Value", value)
}

fn names(ms: &[Message]) -> Vec<String> {
    ms.iter()
        .map(|m| {
            format!(
                "{} {} {}",
                m.event().unwrap_or("-"),
                m.get("Device").or(m.get("Exten")).unwrap_or(""),
                m.get("State").or(m.get("Status")).unwrap_or("")
            )
        })
        .collect()
}

#[tokio::test]
async fn events_mask_filters_by_class() {
    let sim = spawn(capture_config("pbx-a")).await;
    let addr = sim.local_addr();
    // Events: off at login: no FullyBooted, no SuccessfulAuth, no state events.
    let mut off = Client::login(addr, &[("Events", "off")]).await;
    // Events: call: state events but not system/security ones.
    let mut call = Client::login(addr, &[("Events", "call")]).await;
    // Events: system: FullyBooted but no call events.
    let mut sys = Client::connect(addr).await;
    sys.send(
        Message::action("Login")
            .with("Username", "admin")
            .with("Secret", "adminsecret")
            .with("Events", "system"),
    )
    .await;
    assert_eq!(
        sys.recv().await.get("Message"),
        Some("Authentication accepted")
    );
    assert_eq!(sys.recv().await.event(), Some("FullyBooted"));

    let (ev, r) = off
        .action(setvar("DEVICE_STATE(Custom:dnd300)", "BUSY"), "s1")
        .await;
    assert!(ev.is_empty());
    assert_eq!(r.get("Message"), Some("Variable Set"));
    assert!(off.events_before_ping("p").await.is_empty());
    assert!(sys.events_before_ping("p").await.is_empty());
    let got = call.events_before_ping("p").await;
    assert_eq!(
        names(&got),
        [
            "DeviceStateChange Custom:dnd300 BUSY",
            "ExtensionStatus 300 2"
        ]
    );
    // The Events action switches a session on and off.
    let (_, r) = off
        .action(Message::action("Events").with("EventMask", "on"), "e")
        .await;
    assert_eq!(r.get("Events"), Some("On"));
    let (_, r) = off
        .action(Message::action("Events").with("EventMask", ""), "e2")
        .await;
    assert_eq!(r.get("Message"), Some("Invalid event mask"));
    sim.set_device_state("PJSIP/7", DeviceState::Ringing)
        .expect("phone");
    let got = off.events_before_ping("p2").await;
    assert_eq!(
        names(&got),
        [
            "DeviceStateChange PJSIP/7 RINGING",
            "DeviceStateChange PJSIP/7 RINGING"
        ]
    );
}

fn filter(f: &str) -> Message {
    Message::action("Filter")
        .with("Operation", "Add")
        .with("Filter", f)
}

#[tokio::test]
async fn filter_action_drops_matching_events_but_never_list_items() {
    let sim = spawn(capture_config("pbx-a")).await;
    let mut c = Client::login(sim.local_addr(), &[("Events", "call")]).await;
    let (_, r) = c.action(filter("!Device: Custom:"), "f1").await;
    assert_eq!(
        (r.response(), r.get("Message")),
        (Some("Success"), Some("Success"))
    );
    let (_, r) = c.action(filter("!Event: ExtensionStatus"), "f2").await;
    assert_eq!(r.response(), Some("Success"));
    let (ev, r) = c
        .action(setvar("DEVICE_STATE(Custom:dnd300)", "BUSY"), "s1")
        .await;
    assert_eq!(r.get("Message"), Some("Variable Set"));
    assert!(ev.is_empty());
    sim.set_device_state("PJSIP/7", DeviceState::Ringing)
        .expect("phone");
    let got = c.events_before_ping("p").await;
    assert_eq!(
        names(&got),
        [
            "DeviceStateChange PJSIP/7 RINGING",
            "DeviceStateChange PJSIP/7 RINGING"
        ]
    );
    // List items are written to the session directly: never filtered.
    c.send(Message::action("DeviceStateList").with("ActionID", "l"))
        .await;
    let items = c
        .until(|m| m.event() == Some("DeviceStateListComplete"))
        .await;
    assert!(
        names(&items).contains(&"DeviceStateChange Custom:dnd300 BUSY".to_owned()),
        "{items:?}"
    );
    // Another session has its own filters (none).
    let mut other = Client::login(sim.local_addr(), &[("Events", "call")]).await;
    c.action(setvar("DEVICE_STATE(Custom:dnd300)", "INUSE"), "s2")
        .await;
    assert_eq!(
        names(&other.events_before_ping("p2").await),
        [
            "DeviceStateChange Custom:dnd300 INUSE",
            "ExtensionStatus 300 1"
        ]
    );
    // Asterisk's refusals.
    let (_, r) = c
        .action(
            Message::action("Filter")
                .with("Operation", "Remove")
                .with("Filter", "x"),
            "f3",
        )
        .await;
    assert_eq!(r.get("Message"), Some("Unknown operation"));
    let (_, r) = c.action(filter("!Device: (Custom"), "f4").await;
    assert_eq!(
        r.get("Message"),
        Some("Filter did not compile.  Check the syntax of the filter given.")
    );
}

#[tokio::test]
async fn write_permissions_and_eventfilter_lines_as_in_manager_conf() {
    // write = call: Filter (system) is refused, Setvar (call) runs, Command (command) not;
    // ListCommands names only what the user may run.
    let sim = spawn(SimConfig {
        write: hintfed_sim::event::CALL,
        event_filters: vec!["!Device: Custom:".to_owned()],
        ..capture_config("pbx-a")
    })
    .await;
    let mut c = Client::login(sim.local_addr(), &[("Events", "call")]).await;
    let (_, r) = c.action(filter("!Event: ExtensionStatus"), "f").await;
    assert_eq!(
        (r.response(), r.get("Message")),
        (Some("Error"), Some("Permission denied"))
    );
    let (_, r) = c
        .action(
            Message::action("Command").with("Command", "core show uptime"),
            "c",
        )
        .await;
    assert_eq!(r.get("Message"), Some("Permission denied"));
    let (_, r) = c.action(Message::action("ListCommands"), "lc").await;
    assert!(r.get("Setvar").is_some() && r.get("Ping").is_some());
    assert!(r.get("Filter").is_none() && r.get("Command").is_none());
    // The eventfilter line holds from login: the Custom: change is not sent, its hint is.
    let (ev, r) = c
        .action(setvar("DEVICE_STATE(Custom:dnd300)", "BUSY"), "s")
        .await;
    assert_eq!(r.get("Message"), Some("Variable Set"));
    assert!(ev.is_empty());
    assert_eq!(
        names(&c.events_before_ping("p").await),
        ["ExtensionStatus 300 2"]
    );
}

#[tokio::test]
async fn admin_actions_and_stats() {
    let sim = spawn(capture_config("pbx-a")).await;
    let mut c = Client::login(sim.local_addr(), &[]).await;
    c.until(|m| m.event() == Some("SuccessfulAuth")).await;
    let set = Message::action("SimSetDeviceState")
        .with("Device", "Local/200@phones")
        .with("State", "INUSE");
    let (_, r) = c.action(set, "a1").await;
    assert_eq!(r.get("Message"), Some("Device state set"));
    let got = c.events_before_ping("p1").await;
    assert_eq!(
        names(&got),
        [
            "DeviceStateChange Local/200@phones INUSE",
            "DeviceStateChange Local/200@phones INUSE",
            "ExtensionStatus 200 1"
        ]
    );
    let bad = Message::action("SimSetDeviceState")
        .with("Device", "PJSIP/1")
        .with("State", "HAPPY");
    let (_, r) = c.action(bad, "a2").await;
    assert_eq!(r.response(), Some("Error"));
    let (_, r) = c
        .action(setvar("DEVICE_STATE(PJSIP/1)", "INUSE"), "s")
        .await;
    assert_eq!(r.get("Message"), Some("Variable not set"));
    let (_, r) = c.action(Message::action("SimStats"), "st").await;
    assert_eq!(r.get("SetvarTotal"), Some("1"));
    assert_eq!(r.get("SetvarRefused"), Some("1"));
    assert_eq!(r.get("Action-SimSetDeviceState"), Some("2"));
    assert_eq!(r.get("Connections"), Some("1"));
    assert_eq!(r.get("LoginsAccepted"), Some("1"));
    let stats = sim.stats();
    assert_eq!(stats.setvar_accepted, 0);
    assert_eq!(stats.actions.get("Ping"), Some(&1));
    // Known actions are counted under their canonical spelling, unknown ones as written.
    for (action, id) in [
        ("PING", "u1"),
        ("NoSuchAction", "u2"),
        ("NoSuchAction", "u3"),
    ] {
        c.action(Message::action(action), id).await;
    }
    let (_, r) = c.action(Message::action("simstats"), "st2").await;
    assert_eq!(r.get("Action-Ping"), Some("2"));
    assert_eq!(r.get("Action-NoSuchAction"), Some("2"));
    assert_eq!(r.get("Action-SimStats"), Some("2"));
    let stats = sim.stats();
    assert_eq!(stats.actions.get("Ping"), Some(&2));
    assert_eq!(stats.actions.get("NoSuchAction"), Some(&2));
    assert_eq!(stats.actions.get("PING"), None);
}

#[tokio::test]
async fn actions_before_login_are_refused() {
    let sim = spawn(capture_config("pbx-a")).await;
    let mut c = Client::connect(sim.local_addr()).await;
    let (_, r) = c.action(Message::action("Ping"), "p").await;
    assert_eq!(r.get("Message"), Some("Permission denied"));
    c.send(Message::new().with("Foo", "bar")).await;
    assert_eq!(
        c.recv().await.get("Message"),
        Some("Missing action in request")
    );
    let (_, r) = c.action(Message::action("Logoff"), "l").await;
    assert_eq!(r.response(), Some("Goodbye"));
    c.expect_eof().await;
}

#[tokio::test]
async fn blackhole_keeps_tcp_open_and_answers_nothing() {
    let sim = spawn(capture_config("pbx-a")).await;
    let mut c = Client::login(sim.local_addr(), &[("Events", "off")]).await;
    let (_, r) = c.action(Message::action("SimBlackhole"), "b").await;
    assert_eq!(r.get("Message"), Some("Blackhole on"));
    c.send(Message::action("Ping").with("ActionID", "lost"))
        .await;
    eventually("the ping to be swallowed", || {
        sim.stats().blackholed_actions == 1
    })
    .await;
    // Still connected: lifting the blackhole, the next answer is for the next action.
    let (_, r) = c
        .action(Message::action("SimBlackhole").with("Seconds", "0"), "off")
        .await;
    assert_eq!(r.get("Message"), Some("Blackhole off"));
    assert!(c.events_before_ping("p").await.is_empty());

    // While the server is blackholed, new connections get no banner until it ends.
    sim.blackhole(None);
    let mut fresh = tokio::net::TcpStream::connect(sim.local_addr())
        .await
        .expect("connect");
    let mut banner = [0u8; 30];
    let early =
        tokio::time::timeout(Duration::from_millis(100), fresh.read_exact(&mut banner)).await;
    assert!(early.is_err(), "banner sent while blackholed");
    sim.unblackhole();
    tokio::time::timeout(DEADLINE, fresh.read_exact(&mut banner))
        .await
        .expect("banner after the blackhole")
        .expect("read");
    assert_eq!(&banner, b"Asterisk Call Manager/13.0.0\r\n");

    // A connection-scoped blackhole leaves other connections alone.
    let mut other = Client::login(sim.local_addr(), &[("Events", "off")]).await;
    c.action(
        Message::action("SimBlackhole").with("Scope", "connection"),
        "b2",
    )
    .await;
    c.send(Message::action("Ping").with("ActionID", "lost2"))
        .await;
    eventually("the second ping to be swallowed", || {
        sim.stats().blackholed_actions == 2
    })
    .await;
    assert!(other.events_before_ping("o").await.is_empty());

    // A restart ends a server blackhole.
    sim.blackhole(None);
    sim.restart(Duration::ZERO);
    let mut after = Client::login(sim.local_addr(), &[("Events", "off")]).await;
    assert!(after.events_before_ping("r").await.is_empty());
}

#[tokio::test]
async fn slow_reader_is_dropped_and_others_keep_going() {
    let sim = spawn(SimConfig {
        event_buffer: 16,
        write_timeout: Duration::from_millis(200),
        ..capture_config("pbx-a")
    })
    .await;
    // Logs in, then never reads again.
    let mut lazy = tokio::net::TcpStream::connect(sim.local_addr())
        .await
        .expect("connect");
    lazy.write_all(b"Action: Login\r\nUsername: admin\r\nSecret: adminsecret\r\n\r\n")
        .await
        .expect("login");
    eventually("the lazy login", || sim.stats().logins_accepted == 1).await;
    let mut n = 0u32;
    let end = Instant::now() + DEADLINE;
    while sim.stats().slow_readers_dropped == 0 {
        assert!(Instant::now() < end, "slow reader never dropped");
        for _ in 0..200 {
            let state = if n.is_multiple_of(2) {
                DeviceState::Inuse
            } else {
                DeviceState::NotInuse
            };
            sim.set_device_state(&format!("PJSIP/{}", n % 50), state)
                .expect("set");
            n += 1;
        }
        tokio::task::yield_now().await;
    }
    eventually("the connection to be gone", || sim.stats().connections == 0).await;
    // The simulator still serves.
    let mut c = Client::login(sim.local_addr(), &[("Events", "off")]).await;
    assert!(c.events_before_ping("p").await.is_empty());
}

/// A pipelined burst: the session answers and reports while it reads, each on its own (as
/// Asterisk) or what is ready together in one write; nothing may be lost or reordered.
#[tokio::test]
async fn pipelined_actions_are_answered_in_order_with_every_event() {
    pipelined_burst(false).await;
    pipelined_burst(true).await;
}

async fn pipelined_burst(coalesce_writes: bool) {
    const N: usize = 300;
    const DEVICES: usize = 30;
    let sim = spawn(SimConfig {
        coalesce_writes,
        ..capture_config("pbx-a")
    })
    .await;
    let mut c = Client::login(sim.local_addr(), &[]).await;
    let state = |i: usize| {
        if (i / DEVICES).is_multiple_of(2) {
            "INUSE"
        } else {
            "NOT_INUSE"
        }
    };
    c.send_all((0..N).map(|i| {
        setvar(
            &format!("DEVICE_STATE(Custom:burst{})", i % DEVICES),
            state(i),
        )
        .with("ActionID", format!("b{i}"))
    }))
    .await;
    let last = format!("b{}", N - 1);
    let mut all = c.until(|m| m.action_id() == Some(last.as_str())).await;
    all.extend(c.events_before_ping("after").await);
    let ids: Vec<&str> = all
        .iter()
        .filter(|m| m.response().is_some())
        .filter_map(Message::action_id)
        .collect();
    let want: Vec<String> = (0..N).map(|i| format!("b{i}")).collect();
    assert_eq!(ids, want, "responses in the order of the actions");
    // Each answer is followed by the event of its write (this session is the only writer).
    let first = all
        .iter()
        .position(|m| m.action_id() == Some("b0"))
        .expect("b0");
    assert_eq!(all.len() - first, 2 * N);
    for (i, pair) in all[first..].chunks(2).enumerate() {
        assert_eq!(pair[0].action_id(), Some(want[i].as_str()));
        let device = format!("Custom:burst{}", i % DEVICES);
        assert_eq!(pair[1].get("Device"), Some(device.as_str()), "after b{i}");
    }
    for d in 0..DEVICES {
        let device = format!("Custom:burst{d}");
        let seen: Vec<&str> = all
            .iter()
            .filter(|m| m.event() == Some("DeviceStateChange"))
            .filter(|m| m.get("Device") == Some(device.as_str()))
            .filter_map(|m| m.get("State"))
            .collect();
        let written: Vec<&str> = (d..N).step_by(DEVICES).map(state).collect();
        assert_eq!(seen, written, "{device}: one event per write, in order");
    }
}

#[tokio::test]
async fn garbage_closes_only_that_connection() {
    let sim = spawn(capture_config("pbx-a")).await;
    let mut good = Client::login(sim.local_addr(), &[("Events", "off")]).await;
    // An endless line: the codec limit trips and the connection is closed.
    let mut bad = tokio::net::TcpStream::connect(sim.local_addr())
        .await
        .expect("connect");
    let junk = vec![b'x'; 64 * 1024];
    let _ = bad.write_all(&junk).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(DEADLINE, bad.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection was not closed");
    assert!(buf.starts_with(b"Asterisk Call Manager/13.0.0\r\n"));
    // Binary junk with line ends: answered as messages without an action.
    let mut noisy = Client::connect(sim.local_addr()).await;
    noisy
        .send(Message::new().with("\u{1}\u{2}junk", "\u{7f}"))
        .await;
    assert_eq!(
        noisy.recv().await.get("Message"),
        Some("Missing action in request")
    );
    assert!(good.events_before_ping("p").await.is_empty());
}

#[tokio::test]
async fn random_load_is_reproducible_by_seed() {
    async fn observe(seed: u64) -> Vec<String> {
        let sim = spawn(SimConfig {
            random: Some(RandomLoad::new(5, "PJSIP/", 1000, seed)),
            random_rate: 500.0,
            load_after_login: true,
            ..capture_config("pbx-a")
        })
        .await;
        let mut c = Client::login(sim.local_addr(), &[("Events", "call")]).await;
        let mut seen = Vec::new();
        while seen.len() < 40 {
            let m = c.recv().await;
            if m.event() == Some("DeviceStateChange") {
                seen.push(format!(
                    "{} {}",
                    m.get("Device").unwrap_or(""),
                    m.get("State").unwrap_or("")
                ));
            }
        }
        sim.shutdown().await;
        seen
    }
    let a = observe(7).await;
    let b = observe(7).await;
    let c = observe(8).await;
    assert_eq!(a, b);
    assert_ne!(a, c);
    // Each change is announced twice (the duplicate quirk) and is a real change.
    for pair in a.chunks(2) {
        assert_eq!(pair[0], pair[1]);
    }
    let mut gen_ = RandomLoad::new(5, "PJSIP/", 1000, 7);
    let expected: Vec<String> = (0..20)
        .flat_map(|_| {
            let (d, s) = gen_.next_change();
            let line = format!("{d} {}", s.as_str());
            [line.clone(), line]
        })
        .collect();
    assert_eq!(a, expected);
}

#[tokio::test]
async fn script_drives_phones_and_presence() {
    let script = hintfed_sim::load::parse_script(
        "0 PJSIP/1000 RINGING\n0.01 PJSIP/1000 INUSE\n0.02 presence CustomPresence:alice away,lunch,soon\n",
    )
    .expect("script");
    assert!(matches!(script[0].step, ScriptStep::Device { .. }));
    let _: &ScriptLine = &script[0];
    let sim = spawn(SimConfig {
        script,
        load_after_login: true,
        phone_duplicates: false,
        ..capture_config("pbx-a")
    })
    .await;
    let mut c = Client::login(sim.local_addr(), &[("Events", "call")]).await;
    let got = c.until(|m| m.event() == Some("PresenceStatus")).await;
    assert_eq!(
        names(&got),
        [
            "DeviceStateChange PJSIP/1000 RINGING",
            "DeviceStateChange PJSIP/1000 INUSE",
            "PresenceStateChange  away",
            "PresenceStatus 400 away"
        ]
    );
}

#[tokio::test]
async fn several_servers_in_one_process_are_independent() {
    let a = spawn(capture_config("pbx-a")).await;
    let b = spawn(capture_config("pbx-b")).await;
    assert_ne!(a.local_addr(), b.local_addr());
    let mut ca = Client::login(a.local_addr(), &[("Events", "call")]).await;
    let mut cb = Client::login(b.local_addr(), &[("Events", "call")]).await;
    let (_, r) = ca
        .action(setvar("DEVICE_STATE(Custom:dnd300)", "INUSE"), "s")
        .await;
    assert_eq!(r.get("Message"), Some("Variable Set"));
    let got = ca.events_before_ping("p").await;
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|m| m.get("SystemName") == Some("pbx-a")));
    assert!(cb.events_before_ping("p").await.is_empty());
    assert_eq!(b.getvar("DEVICE_STATE(Custom:dnd300)"), "UNKNOWN");
    assert_eq!(a.getvar("DEVICE_STATE(Custom:dnd300)"), "INUSE");
    b.restart(Duration::ZERO);
    cb.expect_eof().await;
    assert!(ca.events_before_ping("p2").await.is_empty());
}

#[tokio::test]
async fn originate_with_waitsecs_variable_ends_the_call() {
    let sim = spawn(capture_config("pbx-a")).await;
    let mut c = Client::login(sim.local_addr(), &[("Events", "call")]).await;
    let orig = Message::action("Originate")
        .with("Channel", "Local/200@phones")
        .with("Exten", "200")
        .with("Context", "phones")
        .with("Priority", "1")
        .with("Async", "true")
        .with("Variable", "WAITSECS=0.1");
    let (_, r) = c.action(orig, "o").await;
    assert_eq!(r.get("Message"), Some("Originate successfully queued"));
    let got = c.until(|m| m.get("State") == Some("NOT_INUSE")).await;
    let or = got
        .iter()
        .find(|m| m.event() == Some("OriginateResponse"))
        .expect("OriginateResponse");
    assert_eq!(or.get("Context"), Some("phones"));
    assert_eq!(or.get("Channel"), Some("Local/200@phones-00000000;1"));
    let rest = c.until(|m| m.get("Status") == Some("0")).await;
    assert_eq!(
        names(&rest),
        [
            "DeviceStateChange Local/200@phones NOT_INUSE",
            "ExtensionStatus 200 0"
        ]
    );
}

#[tokio::test]
async fn cli_binary_serves_several_servers_and_stops_on_sigterm() {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_hintfed-sim"))
        .args(["--listen", "127.0.0.1:0", "--name", "pbx-a"])
        .args(["--listen", "127.0.0.1:0", "--name", "pbx-b"])
        .arg("--extensions")
        .arg(fixture("extensions.conf"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start hintfed-sim");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut addrs = Vec::new();
    for name in ["pbx-a", "pbx-b"] {
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("listening line in time")
            .expect("read")
            .expect("a line");
        let prefix = format!("listening name={name} addr=");
        let addr = line
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{line}"));
        addrs.push(addr.parse::<std::net::SocketAddr>().expect("addr"));
    }
    for (addr, name) in addrs.iter().zip(["pbx-a", "pbx-b"]) {
        let mut c = Client::login(*addr, &[("Events", "call")]).await;
        c.action(setvar("DEVICE_STATE(Custom:dnd300)", "BUSY"), "s")
            .await;
        let got = c.events_before_ping("p").await;
        assert_eq!(got[0].get("SystemName"), Some(name));
    }
    let pid = child.id().expect("pid").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("exits in time")
        .expect("wait");
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn cli_rejects_bad_configuration_with_status_64() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hintfed-sim"))
        .args(["--listen", "127.0.0.1:0", "--name", "a", "--name", "b"])
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let help = tokio::process::Command::new(env!("CARGO_BIN_EXE_hintfed-sim"))
        .arg("--help")
        .output()
        .await
        .expect("run");
    let text = String::from_utf8_lossy(&help.stdout);
    for opt in [
        "--listen",
        "--name",
        "--username",
        "--secret",
        "--extensions",
        "--script",
        "--random-devices",
        "--rate",
        "--seed",
        "--load-after-login",
        "SimSetDeviceState",
    ] {
        assert!(text.contains(opt), "--help lacks {opt}");
    }
}

#[tokio::test]
async fn extension_state_command_getvar_and_list_commands() {
    let sim = spawn(capture_config("pbx-a")).await;
    let mut c = Client::login(sim.local_addr(), &[("Events", "off")]).await;
    c.action(
        setvar(
            "PRESENCE_STATE(CustomPresence:alice)",
            "away,bHVuY2g=,YmFjayBhdCAy,e",
        ),
        "s1",
    )
    .await;
    let (_, r) = c
        .action(
            Message::action("ExtensionState")
                .with("Exten", "400")
                .with("Context", "test"),
            "e1",
        )
        .await;
    let keys: Vec<&str> = r.headers().map(|(k, _)| k).collect();
    assert_eq!(
        keys,
        [
            "Response",
            "ActionID",
            "Message",
            "Exten",
            "Context",
            "Hint",
            "Status",
            "StatusText",
            "PresenceState",
            "PresenceSubtype",
            "PresenceMessage"
        ]
    );
    assert_eq!(r.get("PresenceSubtype"), Some("lunch"));
    assert_eq!(r.get("PresenceMessage"), Some("back at 2"));
    let (_, r) = c
        .action(
            Message::action("ExtensionState")
                .with("Exten", "999")
                .with("Context", "test"),
            "e2",
        )
        .await;
    assert_eq!(r.get("Status"), Some("-1"));
    assert_eq!(r.get("StatusText"), Some("Unknown"));

    let (_, r) = c
        .action(
            Message::action("Command").with("Command", "core show uptime seconds"),
            "c1",
        )
        .await;
    assert_eq!(r.get("Message"), Some("Command output follows"));
    assert!(
        r.get("Output")
            .is_some_and(|o| o.starts_with("System uptime: "))
    );
    let (_, r) = c
        .action(Message::action("Command").with("Command", "fly away"), "c2")
        .await;
    assert_eq!(r.response(), Some("Error"));
    assert_eq!(
        r.get("Output"),
        Some(
            "No such command 'fly away' (type 'core show help fly away' for other possible commands)"
        )
    );

    let (_, r) = c.action(setvar("MYVAR", "hello"), "s2").await;
    assert_eq!(r.get("Message"), Some("Variable Set"));
    let (_, r) = c
        .action(Message::action("Getvar").with("Variable", "MYVAR"), "g1")
        .await;
    assert_eq!(r.get("Value"), Some("hello"));
    let (_, r) = c
        .action(
            Message::action("Getvar")
                .with("Variable", "PRESENCE_STATE(CustomPresence:alice,subtype,e)"),
            "g2",
        )
        .await;
    assert_eq!(r.get("Value"), Some("bHVuY2g="));

    let (_, r) = c.action(Message::action("CoreStatus"), "cs").await;
    let keys: Vec<&str> = r.headers().map(|(k, _)| k).collect();
    assert_eq!(
        keys,
        [
            "Response",
            "ActionID",
            "CoreStartupDate",
            "CoreStartupTime",
            "CoreReloadDate",
            "CoreReloadTime",
            "CoreCurrentCalls"
        ]
    );
    assert_eq!(r.get("CoreCurrentCalls"), Some("0"));

    let (_, r) = c.action(Message::action("ListCommands"), "l").await;
    assert_eq!(r.get("Ping"), Some("Keepalive command. (Priv: <none>)"));
    assert!(r.get("SimRestart").is_some());
}

#[tokio::test]
async fn no_action_pipelined_after_a_restart_is_answered() {
    let sim = spawn(capture_config("pbx-a")).await;
    let mut c = Client::login(sim.local_addr(), &[("Events", "system")]).await;
    c.send_all([
        Message::action("SimRestart").with("ActionID", "r"),
        Message::action("Ping").with("ActionID", "p"),
    ])
    .await;
    let answered = c.until(|m| m.action_id() == Some("r")).await;
    assert_eq!(
        answered.last().and_then(|m| m.get("Message")),
        Some("Restarting")
    );
    assert_eq!(c.recv().await.event(), Some("Shutdown"));
    c.expect_eof().await;
}

#[tokio::test]
async fn restart_with_downtime_refuses_then_serves_again() {
    let sim = spawn(capture_config("pbx-a")).await;
    let mut c = Client::login(sim.local_addr(), &[("Events", "off")]).await;
    c.send(
        Message::action("SimRestart")
            .with("ActionID", "r")
            .with("DownSeconds", "0.3"),
    )
    .await;
    assert_eq!(c.recv().await.get("Message"), Some("Restarting"));
    c.expect_eof().await;
    // While down, connections are accepted and closed without a banner.
    let mut s = tokio::net::TcpStream::connect(sim.local_addr())
        .await
        .expect("connect");
    let mut buf = Vec::new();
    let n = tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf))
        .await
        .expect("closed in time")
        .expect("read");
    assert_eq!(n, 0, "{buf:?}");
    // Then it serves again, with a fresh uptime.
    let end = Instant::now() + DEADLINE;
    loop {
        assert!(Instant::now() < end, "never came back");
        let mut s = tokio::net::TcpStream::connect(sim.local_addr())
            .await
            .expect("connect");
        let mut banner = [0u8; 30];
        if s.read_exact(&mut banner).await.is_ok() {
            assert_eq!(&banner, b"Asterisk Call Manager/13.0.0\r\n");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sim.stats().restarts, 1);
}

#[tokio::test]
async fn random_bytes_never_take_the_server_down() {
    use rand::{Rng, SeedableRng};
    let sim = spawn(capture_config("pbx-a")).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for _ in 0..40 {
        let mut s = tokio::net::TcpStream::connect(sim.local_addr())
            .await
            .expect("connect");
        let len = rng.random_range(1..20_000);
        let mut junk: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        // Sprinkle line ends so some of it parses as (odd) messages.
        for _ in 0..len / 50 {
            let i = rng.random_range(0..len);
            junk[i] = b'\n';
        }
        let _ = s.write_all(&junk).await;
        let _ = s.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut sink))
            .await
            .expect("the server closes or answers in time");
    }
    let mut c = Client::login(sim.local_addr(), &[("Events", "off")]).await;
    assert!(c.events_before_ping("p").await.is_empty());
    eventually("junk connections to be closed", || {
        sim.stats().connections == 1
    })
    .await;
}

#[tokio::test]
async fn restart_and_shutdown_close_every_session_logged_in_or_not() {
    let sim = spawn(capture_config("pbx-a")).await;
    // A restart: a session still at its banner and an idle logged-in one both close.
    let mut banner_only = Client::connect(sim.local_addr()).await;
    let mut idle = Client::login(sim.local_addr(), &[("Events", "off")]).await;
    sim.restart(Duration::ZERO);
    banner_only.expect_eof().await;
    idle.expect_eof().await;
    // The shutdown: the same for sessions of the new generation.
    let mut banner_only = Client::connect(sim.local_addr()).await;
    let mut idle = Client::login(sim.local_addr(), &[("Events", "off")]).await;
    let (_, pong) = idle.action(Message::action("Ping"), "p").await;
    assert_eq!(pong.get("Ping"), Some("Pong"));
    sim.shutdown().await;
    banner_only.expect_eof().await;
    idle.expect_eof().await;
}
