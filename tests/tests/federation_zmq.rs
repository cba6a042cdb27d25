//! End-to-end: the same federation with `source = zmq` / `apply = zmq`, each agent talking to
//! its Asterisk through the pyzmq res_zmq_manager stand-in (libzmq), which exits with "CRASH"
//! if it ever receives `Getvar` (the real module crashes Asterisk then).
//!
//! Needs the binaries (`cargo build -p hintfed-sim -p hintfed-server -p hintfed-agent`) and
//! Python 3 with pyzmq (`tests/requirements.txt`).

use std::collections::BTreeMap;
use std::time::Duration;

use hintfed_e2e::fed::{Federation, Via, setvar_delta};

const ALL: [&str; 3] = ["pbx-a", "pbx-b", "pbx-c"];
const WITHIN: Duration = Duration::from_secs(10);

const ALICE: &str = "CustomPresence:alice";
/// Alice's presence set on pbx-c (a comma in the message).
const DND: (&str, &str, &str) = ("dnd", "lunch", "back at 2, maybe");

async fn zmq_federation() -> Federation {
    let mut f = Federation::start(&ALL, Via::Zmq).await;
    for n in ALL {
        f.add_standin(n).await;
    }
    f.add_hub().await;
    f.add_hub().await;
    for n in ALL {
        f.add_agent(n).await;
    }
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zmq_federation_propagates_without_getvar_and_survives_an_asterisk_death() {
    let mut f = zmq_federation().await;

    f.ami("pbx-a").set_device("PJSIP/100", "INUSE").await;
    assert!(
        f.wait_custom("PJSIP/100", "INUSE", &["pbx-b", "pbx-c"], WITHIN)
            .await,
        "device state through res_zmq_manager"
    );
    f.ami("pbx-c")
        .set_presence(ALICE, DND.0, DND.1, DND.2)
        .await;
    assert!(
        f.wait_presence(ALICE, DND, &["pbx-a", "pbx-b"], WITHIN)
            .await,
        "presence on pbx-a and pbx-b"
    );
    // No loop through the module either: one change, one write on each other Asterisk.
    let before = f.settled_setvars().await;
    f.ami("pbx-b").set_device("PJSIP/200", "RINGING").await;
    assert!(
        f.wait_custom("PJSIP/200", "RINGING", &["pbx-a", "pbx-c"], WITHIN)
            .await
    );
    let after = f.settled_setvars().await;
    assert_eq!(
        setvar_delta(&before, &after),
        BTreeMap::from([("pbx-a", 1), ("pbx-b", 0), ("pbx-c", 1)]),
        "one Setvar on each other Asterisk, none on the origin: {before:?} -> {after:?}"
    );

    // pbx-b's Asterisk dies: the simulator restarts (its state is gone) and the module goes
    // with it (the stand-in exits when its AMI link closes). The others see pbx-b's phones
    // as down, then everything comes back when a new module answers.
    f.ami("pbx-b").restart().await;
    {
        let s = f.standins.get_mut("pbx-b").expect("stand-in");
        let p = s.proc.as_mut().expect("running");
        assert!(
            p.wait_exit(WITHIN).await.is_some(),
            "stand-in exits with its Asterisk"
        );
    }
    assert!(
        f.wait_custom("PJSIP/200", "UNAVAILABLE", &["pbx-a", "pbx-c"], WITHIN)
            .await,
        "pbx-b's phone shows down_state while its Asterisk is gone"
    );
    f.start_standin("pbx-b").await;
    assert!(
        f.wait_custom("PJSIP/100", "INUSE", &["pbx-b"], WITHIN)
            .await,
        "remote device state re-applied on the restarted Asterisk"
    );
    assert!(
        f.wait_presence(ALICE, DND, &["pbx-b"], WITHIN).await,
        "presence re-applied on the restarted Asterisk"
    );
    // Events flow again from the restarted Asterisk.
    f.ami("pbx-b").set_device("PJSIP/200", "BUSY").await;
    assert!(
        f.wait_custom("PJSIP/200", "BUSY", &["pbx-a", "pbx-c"], WITHIN)
            .await,
        "pbx-b's events flow again after the restart"
    );

    // Getvar was never sent through any stand-in.
    assert!(!f.standin_crashed(), "a stand-in received Getvar");
    for (n, s) in &mut f.standins {
        let p = s.proc.as_mut().expect("running");
        assert_eq!(p.exit_code(), None, "stand-in {n} still running");
    }
}
