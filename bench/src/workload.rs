//! The workload: the seed's `EmailMessage`, about 200 bytes of JSON, or
//! padded to the size `--payload` asks for.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The seed's message. `sent_at_ns` carries the publish time for latency.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "peers", derive(ruststream::Outgoing))]
#[serde(rename_all = "camelCase")]
pub(crate) struct EmailMessage {
    pub(crate) to: String,
    pub(crate) subject: String,
    pub(crate) template: String,
    pub(crate) data: BTreeMap<String, String>,
    pub(crate) user_id: String,
    pub(crate) timestamp: String,
    pub(crate) sent_at_ns: u128,
}

pub(crate) fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Padding that brings every message to the size `--payload` asked for.
static FILLER: OnceLock<String> = OnceLock::new();

/// Makes every message about `bytes` of JSON (at least the plain message's
/// size, about 200 bytes), by padding its `data` with a `filler` field.
pub(crate) fn set_payload_size(bytes: usize) {
    let plain = payload(0).len() + r#","filler":"""#.len();
    let _ = FILLER.set("x".repeat(bytes.saturating_sub(plain)));
}

/// Message number `i`.
pub(crate) fn email(i: usize) -> EmailMessage {
    let mut data = BTreeMap::from([("name".to_owned(), format!("User number {i}"))]);
    if let Some(filler) = FILLER.get().filter(|f| !f.is_empty()) {
        data.insert("filler".to_owned(), filler.clone());
    }
    EmailMessage {
        to: format!("user{i}@example.com"),
        subject: "Welcome to the platform".to_owned(),
        template: "welcome".to_owned(),
        data,
        user_id: format!("user-{i}"),
        timestamp: "2026-11-28T12:00:00Z".to_owned(),
        sent_at_ns: now_ns(),
    }
}

pub(crate) fn payload(i: usize) -> Vec<u8> {
    serde_json::to_vec(&email(i)).expect("an EmailMessage always encodes")
}

/// The routing key of the workload.
pub(crate) const ROUTING_KEY: &str = "user.welcome";

/// p50 and p99 of latencies in microseconds.
pub(crate) fn percentiles(mut samples: Vec<f64>) -> (f64, f64) {
    if samples.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.50), at(0.99))
}

/// The median of a few runs.
pub(crate) fn median(mut runs: Vec<f64>) -> f64 {
    runs.sort_by(|a, b| a.total_cmp(b));
    runs[runs.len() / 2]
}

/// Peak resident memory of this process, in KiB (Linux `VmHWM`).
pub(crate) fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
