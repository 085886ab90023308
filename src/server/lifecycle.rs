//! The server's life: signals, draining and exit. SIGTERM or SIGINT starts a drain: /health answers 503,
//! responses ask clients to close their connections, the listener stops accepting, every request already
//! accepted is answered, then the process exits 0 — or when the shutdown deadline passes, whatever is left.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: anything more is not async-signal-safe.
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// Routes SIGTERM and SIGINT to the drain instead of killing the process.
pub fn install_signal_handlers() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction with a plain handler is valid; the handler only stores an atomic.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// Whether a drain has begun, and how many requests are being handled.
pub struct Lifecycle {
    draining: AtomicBool,
    in_flight: AtomicUsize,
}

impl Lifecycle {
    pub fn new() -> Lifecycle {
        Lifecycle {
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
        }
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Counts a request as in flight until the guard is dropped.
    pub fn track(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Blocks until a signal arrives, then marks the drain.
    pub fn wait_for_signal(&self) {
        while !SIGNALLED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Waits until `done` says so, or until `deadline`; returns whether it did.
    pub fn wait_for(&self, deadline: Duration, done: &dyn Fn() -> bool) -> bool {
        let started = Instant::now();
        loop {
            if done() {
                return true;
            }
            if started.elapsed() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub struct InFlight<'a>(&'a Lifecycle);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Ends the process with status 1 after one clear log line: the serving path is broken beyond repair, and
/// a supervisor (systemd's `Restart=on-failure`, Kubernetes) starts a fresh process. Better than a process
/// that lives on without serving, which nothing would restart.
pub fn fatal(message: &str) -> ! {
    eprintln!("fatal: {message}; exiting with status 1 so that a supervisor restarts the server");
    std::process::exit(1)
}

/// Raises the soft limit on open files to the hard limit, so that many idle connections cannot exhaust it;
/// returns the soft limit in force afterwards. Where raising is not allowed (a seccomp filter without
/// setrlimit, as in the systemd unit, whose `LimitNOFILE` sets both limits), the soft limit stays.
pub fn raise_fd_limit() -> usize {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
        usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
    }
}

/// Hands freed heap pages back to the system. glibc keeps them after a burst of large requests, which shows
/// as RSS that never comes down; musl returns them by itself.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
