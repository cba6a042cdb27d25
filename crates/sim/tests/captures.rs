//! The simulator against the real Asterisk captures in `shared/fixtures/asterisk/`.
//!
//! What is compared, for every action of a transcript replayed in order on one connection:
//! the messages the simulator sends after the action, against the capture's messages received
//! after it (until the next action), with
//! - the same number of messages, the same header names in the same order, and the same values
//!   except those that vary from run to run (`common::VARYING`: Challenge, Uptime, LastReload,
//!   Timestamp, EventTV, SessionTV, SessionID, Local/RemoteAddress, Uniqueid, Linkedid);
//!   the MD5 `Key` sent is recomputed for the simulator's challenge;
//! - responses and other messages at exactly their position; runs of consecutive state events
//!   (DeviceStateChange, ExtensionStatus, PresenceStateChange, PresenceStatus) and the items
//!   of one list compared as multisets, because real Asterisk orders them differently from run
//!   to run (the two captures show both orders);
//! - for the Originate, the channel events (Newchannel, Newexten, VarSet, LocalBridge,
//!   DialBegin/End, Newstate, (Soft)HangupRequest, Hangup) removed from the expected side: the
//!   DeviceStateChange/ExtensionStatus/OriginateResponse subset must match;
//! - after `Logoff` the connection must close with nothing more sent.

mod common;

use common::*;
use hintfed_ami::Message;
use md5::{Digest, Md5};

async fn replay(transcript: &str, cfg: hintfed_sim::SimConfig) {
    let (banner, steps) = steps(transcript);
    assert!(
        steps.len() > 10,
        "transcript parsed into {} steps",
        steps.len()
    );
    let sim = spawn(cfg).await;
    let mut c = Client::connect(sim.local_addr()).await;
    assert_eq!(c.banner, banner);
    let mut challenge = String::new();
    for step in &steps {
        let mut action = step.action.clone();
        let label = format!(
            "{} {}",
            action.action_name().unwrap_or("?"),
            action.action_id().unwrap_or("")
        );
        if action.get("Key").is_some() {
            let mut h = Md5::new();
            h.update(challenge.as_bytes());
            h.update(b"adminsecret");
            action.set("Key", hex::encode(h.finalize()));
        }
        c.send(action).await;
        let expected: Vec<Message> = step
            .expected
            .iter()
            .filter(|m| !is_channel_event(m))
            .cloned()
            .collect();
        let mut actual = Vec::new();
        for _ in 0..expected.len() {
            actual.push(c.recv().await);
        }
        if let Some(ch) = actual.first().and_then(|m| m.get("Challenge")) {
            challenge = ch.to_owned();
        }
        assert_same(&label, &expected, &actual);
    }
    c.expect_eof().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn session_transcript_replays_identically() {
    replay("session.transcript", capture_config("pbx-a")).await;
}

#[tokio::test]
async fn devicestatelist_500_transcript_replays_identically() {
    let cfg = hintfed_sim::SimConfig {
        preload_custom: 500,
        ..capture_config("pbx-b")
    };
    replay("devicestatelist-500.transcript", cfg).await;
}

#[tokio::test]
async fn bad_login_is_answered_like_the_capture_and_closes() {
    let (banner, steps) = steps("bad-login.transcript");
    assert_eq!(steps.len(), 1);
    let sim = spawn(capture_config("pbx-a")).await;
    let mut c = Client::connect(sim.local_addr()).await;
    assert_eq!(c.banner, banner);
    c.send(steps[0].action.clone()).await;
    let got = c.recv().await;
    assert_same("bad login", &steps[0].expected, &[got]);
    c.expect_eof().await;
    // The raw capture holds exactly the same bytes.
    let (_, raw) = raw_messages("bad-login.recv.raw");
    assert_eq!(raw, steps[0].expected);
    assert_eq!(sim.stats().logins_failed, 1);
}

#[tokio::test]
async fn md5_login_with_a_wrong_key_is_refused() {
    let sim = spawn(hintfed_sim::SimConfig {
        auth_failure_delay: std::time::Duration::ZERO,
        ..capture_config("pbx-a")
    })
    .await;
    let mut c = Client::connect(sim.local_addr()).await;
    let (_, r) = c
        .action(Message::action("Challenge").with("AuthType", "MD5"), "c")
        .await;
    assert!(r.get("Challenge").is_some_and(|ch| !ch.is_empty()));
    let login = Message::action("Login")
        .with("AuthType", "MD5")
        .with("Username", "admin")
        .with("Key", "00000000000000000000000000000000");
    let (_, r) = c.action(login, "l").await;
    assert_eq!(r.get("Message"), Some("Authentication failed"));
    c.expect_eof().await;
}

#[tokio::test]
async fn restart_renames_custom_devices_like_the_capture() {
    let sim = spawn(capture_config("pbx-a")).await;
    let mut c = Client::login(sim.local_addr(), &[("Events", "off")]).await;
    for (id, var, value) in [
        ("a", "DEVICE_STATE(Custom:dnd300)", "NOT_INUSE"),
        ("b", "DEVICE_STATE(Custom:Local/100@phones)", "RINGING"),
    ] {
        let (_, r) = c
            .action(
                Message::action("Setvar")
                    .with("Variable", var)
                    .with("Value", value),
                id,
            )
            .await;
        assert_eq!(r.get("Message"), Some("Variable Set"));
    }
    let mut watcher = Client::login(sim.local_addr(), &[]).await;
    watcher.events_before_ping("w").await;
    let (_, r) = c.action(Message::action("SimRestart"), "r").await;
    assert_eq!(r.get("Message"), Some("Restarting"));
    c.expect_eof().await;
    // Other clients see Asterisk's Shutdown event, then the connection drops.
    let shutdown = watcher.recv().await;
    assert_eq!(shutdown.event(), Some("Shutdown"));
    assert_eq!(shutdown.get("Restart"), Some("True"));
    watcher.expect_eof().await;

    // After the restart: the capture's login (plain, no events) and DeviceStateList.
    let (banner, expected) = raw_messages("after-restart.recv.raw");
    let mut c = Client::connect(sim.local_addr()).await;
    assert_eq!(c.banner, banner);
    c.send(
        Message::action("Login")
            .with("Username", "admin")
            .with("Secret", "adminsecret")
            .with("Events", "off"),
    )
    .await;
    c.send(Message::action("DeviceStateList").with("ActionID", "d"))
        .await;
    let mut actual = Vec::new();
    for _ in 0..expected.len() {
        actual.push(c.recv().await);
    }
    assert_same("after restart", &expected, &actual);
    // "Custom:Local" is no channel technology: the old name is INVALID until set again.
    let (_, r) = c
        .action(
            Message::action("Getvar").with("Variable", "DEVICE_STATE(Custom:Local/100@phones)"),
            "g",
        )
        .await;
    assert_eq!(r.get("Value"), Some("INVALID"));
    assert_eq!(sim.stats().restarts, 1);
}
