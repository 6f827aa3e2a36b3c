//! The broker's process, where it runs on this machine.

/// The broker process's RSS in MiB and open files, found by its listening
/// port; `None` for memory or a broker elsewhere.
pub(crate) fn usage(url: &str) -> Option<(u64, usize)> {
    if url.starts_with("memory:") {
        return None;
    }
    let port = url.rsplit_once(':')?.1.split('/').next()?.to_owned();
    let out = std::process::Command::new("ss")
        .args(["-ltnpH", &format!("sport = :{port}")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let pid = text.split("pid=").nth(1)?.split(',').next()?.to_owned();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((kb / 1024, fds))
}
