//! Real signals to this test process (`kill`), with no reload receiver held: SIGHUP is
//! counted for receivers created later, SIGTERM cancels the shutdown token.
//! One test only in this file: signals reach the whole process.

use std::time::Duration;

use hintfed_daemon::signals::Signals;
use hintfed_testkit::process::signal_self;

#[tokio::test]
async fn sighup_reloads_and_sigterm_cancels() {
    let signals = Signals::install().expect("install");
    // The signal task must keep watching even though nobody holds a receiver yet.
    tokio::task::yield_now().await;
    let mut reload = signals.reload_receiver();
    signal_self("HUP");
    let n = tokio::time::timeout(Duration::from_secs(5), reload.recv())
        .await
        .expect("SIGHUP noticed");
    assert_eq!(n, Some(1));
    assert!(!signals.shutdown.is_cancelled());
    drop(reload);
    signal_self("TERM");
    tokio::time::timeout(Duration::from_secs(5), signals.shutdown.cancelled())
        .await
        .expect("SIGTERM cancels the token");
}
