//! What broker and interop tests need from their environment, decided in
//! one place: a broker test skips only when its broker is not configured and
//! `BUSWAY_REQUIRE_BROKERS` is not `1`; with it, a missing broker fails.

use anyhow::{bail, ensure};

/// Whether CI demands that every broker test runs.
pub fn brokers_required() -> bool {
    std::env::var("BUSWAY_REQUIRE_BROKERS").as_deref() == Ok("1")
}

/// The broker URL in the environment variable `var` (such as
/// `BUSWAY_TEST_AMQP_URL`). `Ok(None)` means "skip this test": the variable
/// is unset and brokers are not required. Unset while required is an error.
pub fn broker_url(var: &str) -> anyhow::Result<Option<String>> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Ok(Some(url)),
        _ if brokers_required() => {
            bail!("{var} is not set but BUSWAY_REQUIRE_BROKERS=1 requires this broker test to run")
        }
        _ => {
            eprintln!("skipped: {var} is not set");
            Ok(None)
        }
    }
}

/// Runs a Python script (`python3 -c SCRIPT ARGS..`) that speaks to a broker
/// with the reference client library, and returns its trimmed stdout.
/// `Ok(None)` when Python or pika is missing and brokers are not required;
/// a failing script is always an error.
pub fn run_python(script: &str, args: &[&str]) -> anyhow::Result<Option<String>> {
    let missing = |why: String| {
        if brokers_required() {
            bail!("interop test required but unavailable: {why}")
        }
        eprintln!("skipped: {why}");
        Ok(None)
    };
    let out = match std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
    {
        Ok(out) => out,
        Err(e) => return missing(format!("python3: {e}")),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No module named 'pika'") {
        return missing("the pika module is not installed (pip install pika)".into());
    }
    ensure!(out.status.success(), "python script failed: {stderr}");
    Ok(Some(String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}
