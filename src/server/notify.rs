//! The service manager's notify protocol (systemd's `sd_notify`): `READY=1` once the models are loaded and
//! a request has gone through the socket, `STOPPING=1` when draining begins, and `WATCHDOG=1` after each
//! successful self-probe when the unit sets `WatchdogSec=`. Written by hand (a datagram to `$NOTIFY_SOCKET`) rather than linking libsystemd, so the
//! static binary stays static. Without `$NOTIFY_SOCKET` every call does nothing.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

const SOCKET_VAR: &str = "NOTIFY_SOCKET";

/// Tells the service manager that the server answers requests now.
pub fn ready() {
    send(&format!("READY=1\nMAINPID={}", std::process::id()));
}

/// Tells the service manager that the server is draining and about to exit.
pub fn stopping() {
    send("STOPPING=1");
}

/// Tells the service manager that the server still serves. Called by the self-probe (`probe.rs`) after
/// each request that went all the way through, never merely because a thread is alive.
pub fn watchdog() {
    send("WATCHDOG=1");
}

/// Half of `$WATCHDOG_USEC` (half, as systemd recommends, so that one late probe is not fatal), when the
/// unit has a watchdog and it is meant for this process.
pub fn watchdog_period() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    // WATCHDOG_PID names the process the watchdog is for; a child that inherited it must stay quiet.
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Sends one state datagram. A failure is reported, not fatal: the server works without a service manager.
fn send(state: &str) {
    let Some(target) = std::env::var_os(SOCKET_VAR).filter(|v| !v.is_empty()) else {
        return;
    };
    let target = target.to_string_lossy().into_owned();
    let result = address(&target).and_then(|address| {
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(state.as_bytes(), &address)
    });
    if let Err(e) = result {
        eprintln!("warning: cannot notify the service manager at {SOCKET_VAR}={target}: {e}");
    }
}

/// A leading '@' names a socket in Linux's abstract namespace; anything else is a path.
fn address(target: &str) -> std::io::Result<SocketAddr> {
    match target.strip_prefix('@') {
        Some(name) => abstract_address(name.as_bytes()),
        None => SocketAddr::from_pathname(target),
    }
}

#[cfg(target_os = "linux")]
fn abstract_address(name: &[u8]) -> std::io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(target_os = "linux"))]
fn abstract_address(_name: &[u8]) -> std::io::Result<SocketAddr> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract socket names exist only on Linux",
    ))
}
