//! `deploy/check.py --static-only` in the test suite: the Containerfile's COPY sources and
//! binaries, and the compose file's binaries, mounted files, ports and cross-service
//! references, checked against the repository (no container engine needed). The
//! `--check-config` part needs the release or debug binaries: run the script by hand or in
//! `scripts/test` after the build. Skips with a reason without python3 + PyYAML.

use std::path::Path;
use std::process::Command;

#[test]
fn deploy_files_reference_what_exists() {
    let has_yaml = Command::new("python3")
        .args(["-c", "import yaml"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_yaml {
        eprintln!("skipped: python3 with PyYAML not available");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("python3")
        .arg(root.join("deploy/check.py"))
        .arg("--static-only")
        .output()
        .expect("run deploy/check.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("deploy check: OK"), "{stdout}");
}
