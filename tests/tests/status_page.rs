//! End-to-end: the agent's status page in headless Chromium (issue 7). One `hintfed-sim`
//! serving pbx-a and pbx-b, one hub, two agents; pbx-b's agent page is opened in Chromium
//! (`tests/browser/status_page.py`, DevTools over a pipe, stdlib Python), then a phone on
//! pbx-a changes state (`SimSetDeviceState`) and a presence is set there: both must appear on
//! the page without a reload, in the BLF colour of the state; the origins table shows pbx-a's
//! lag as a duration (the age of its last device update on arrival). Screenshots (phone size and
//! desktop size) are saved under the target directory and their paths printed.
//!
//! Skipped, with the reason printed, when Chromium or python3 is missing (`.ci/run` installs
//! Debian's `chromium`). `HINTFED_CHROMIUM` overrides the browser path.
//!
//! Needs the binaries: `cargo build -p hintfed-sim -p hintfed-server -p hintfed-agent`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hintfed_e2e::fed::{Federation, Via};
use hintfed_e2e::{Proc, workspace_root};
use hintfed_testkit::http;

const WITHIN: Duration = Duration::from_secs(10);

/// Chromium to use, if any: `HINTFED_CHROMIUM`, else `chromium` / `chromium-browser` on PATH.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HINTFED_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| [d.join("chromium"), d.join("chromium-browser")])
        .find(|p| p.is_file())
}

fn python3_works() -> bool {
    Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits for a line of `p` containing `needle`; fails the test at once on `FAIL` or an exit.
async fn expect_line(p: &mut Proc, needle: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let lines = p.lines();
        if let Some(l) = lines.iter().find(|l| l.starts_with(needle)) {
            return l.clone();
        }
        if let Some(l) = lines.iter().find(|l| l.starts_with("FAIL")) {
            panic!("browser check: {l}\n{}", lines.join("\n"));
        }
        if let Some(code) = p.wait_exit(Duration::ZERO).await {
            panic!(
                "browser check exited ({code}) before {needle:?}:\n{}",
                lines.join("\n")
            );
        }
        assert!(
            Instant::now() < deadline,
            "browser check: no {needle:?} within {within:?}:\n{}",
            lines.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_change_appears_on_the_status_page_without_reload() {
    let Some(chromium) = chromium() else {
        eprintln!("SKIP: no chromium on PATH (Debian: apt-get install chromium)");
        return;
    };
    if !python3_works() {
        eprintln!("SKIP: python3 not found (it drives Chromium)");
        return;
    }
    let mut f = Federation::start(&["pbx-a", "pbx-b"], Via::Ami).await;
    f.add_hub().await;
    f.add_agent("pbx-a").await;
    f.add_agent("pbx-b").await;

    // Phone 100 lives on pbx-a: idle there, and pbx-b's lamp knows it.
    f.ami("pbx-a").set_device("PJSIP/100", "NOT_INUSE").await;
    assert!(
        f.wait_custom("PJSIP/100", "NOT_INUSE", &["pbx-b"], WITHIN)
            .await,
        "PJSIP/100 never reached pbx-b"
    );
    let page = f.agents["pbx-b"].http.clone();
    let listed = http::get_until(page.as_str(), "/api/state", WITHIN, |r| {
        r.body.contains("PJSIP/100")
    });
    assert!(
        listed.await.is_some(),
        "pbx-b's /api/state never listed PJSIP/100"
    );

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status_page");
    let phone_png = dir.join("status-page-phone.png");
    let desktop_png = dir.join("status-page-desktop.png");
    let _ = std::fs::remove_file(&phone_png);
    let _ = std::fs::remove_file(&desktop_png);
    let script = workspace_root().join("tests/browser/status_page.py");
    let args: Vec<String> = [
        script.display().to_string(),
        "--url".into(),
        format!("http://{page}/"),
        "--key".into(),
        "PJSIP/100".into(),
        "--column".into(),
        "pbx-a".into(),
        "--state".into(),
        "INUSE".into(),
        "--presence".into(),
        "CustomPresence:alice".into(),
        "--message".into(),
        "back at 2".into(),
        "--lag-origin".into(),
        "pbx-a".into(),
        "--screenshot".into(),
        phone_png.display().to_string(),
        "--screenshot-desktop".into(),
        desktop_png.display().to_string(),
        "--chromium".into(),
        chromium.display().to_string(),
        "--timeout".into(),
        "30".into(),
    ]
    .into_iter()
    .collect();
    let mut browser = Proc::spawn("browser", std::path::Path::new("python3"), &args);

    // The page is loaded and live, PJSIP/100 not INUSE yet: the phone goes off-hook.
    expect_line(&mut browser, "READY", Duration::from_secs(30)).await;
    f.ami("pbx-a").set_device("PJSIP/100", "INUSE").await;

    expect_line(&mut browser, "READY-PRESENCE", Duration::from_secs(30)).await;
    f.ami("pbx-a")
        .setvar(
            "PRESENCE_STATE(CustomPresence:alice)",
            "dnd,lunch,back at 2",
        )
        .await;

    expect_line(&mut browser, "PASS", Duration::from_secs(30)).await;
    assert_eq!(
        browser.wait_exit(WITHIN).await,
        Some(0),
        "{}",
        browser.lines().join("\n")
    );
    for png in [&phone_png, &desktop_png] {
        let bytes = std::fs::read(png).unwrap_or_default();
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 1000,
            "{} is not a PNG",
            png.display()
        );
        println!("screenshot: {}", png.display());
        eprintln!("screenshot: {}", png.display());
    }
}
