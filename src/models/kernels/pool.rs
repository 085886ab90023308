//! The engine's persistent team of worker threads: spawned once, reused by every batch, so that a forward
//! pass costs at most one wake-up however many matrix products it runs.
//!
//! A job is one closure that every member of a team runs at once (SPMD): member `i` of `n` takes its own
//! share of each step and meets the others at [`Team::barrier`] where a step needs the others' results.
//! Waiting (for a job, at a barrier, for the team to finish) spins briefly, then sleeps on a condition
//! variable, so that an idle engine costs no CPU and a busy one pays no futex round trip per barrier.
//!
//! The pool never becomes unusable: workers that cannot be spawned (a pids limit) only make teams
//! smaller, down to the caller alone; a job that panics on any member poisons that job's barriers (the
//! other members unwind instead of waiting forever), the panic is re-raised on the caller once every
//! member has left the job, and the workers go on serving later jobs. A caller that finds the pool busy
//! (another model's engine thread, a nested call) runs its job alone instead of waiting.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long a worker spins for the next job before it sleeps: long enough to catch the next batch of a
/// busy queue, short enough that an idle server costs nothing.
const IDLE_SPIN: Duration = Duration::from_micros(200);
/// How long a member spins at a barrier (or the caller for the team) before it sleeps: the other members
/// are normally microseconds away; longer means another process holds their core.
const BARRIER_SPIN: Duration = Duration::from_micros(500);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A condition some threads wait for and one thread makes true: waiters spin, then sleep; the thread
/// that makes it true calls [`Event::notify`] afterwards, which costs a lock only if someone sleeps.
#[derive(Default)]
struct Event {
    mutex: Mutex<()>,
    condvar: Condvar,
    sleepers: AtomicUsize,
}

impl Event {
    /// Returns once `ready()` is true. `ready` must read with `SeqCst` what the notifier wrote with it.
    fn wait(&self, spin: Duration, ready: impl Fn() -> bool) {
        if ready() {
            return;
        }
        let started = Instant::now();
        'spin: loop {
            for _ in 0..64 {
                std::hint::spin_loop();
                if ready() {
                    return;
                }
            }
            if started.elapsed() >= spin {
                break 'spin;
            }
        }
        let mut guard = lock(&self.mutex);
        // With the counter raised before `ready` is read again (both SeqCst), a notifier either sees a
        // sleeper and takes the lock (which this thread holds until it waits), or this read sees `ready`.
        self.sleepers.fetch_add(1, SeqCst);
        while !ready() {
            guard = self
                .condvar
                .wait(guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        self.sleepers.fetch_sub(1, SeqCst);
    }

    /// Wakes the sleepers; call after making the condition true (with a `SeqCst` write).
    fn notify(&self) {
        if self.sleepers.load(SeqCst) > 0 {
            let _guard = lock(&self.mutex);
            self.condvar.notify_all();
        }
    }
}

/// What every member of the current job shares: the barrier and the poison flag.
#[derive(Default)]
struct TeamState {
    size: AtomicUsize,
    arrived: AtomicUsize,
    generation: AtomicU64,
    poisoned: AtomicBool,
    event: Event,
}

/// One member's view of the job it runs.
pub struct Team<'a> {
    index: usize,
    size: usize,
    state: Option<&'a TeamState>,
}

impl Team<'_> {
    /// A team of one: the caller alone, barriers are free.
    pub fn solo() -> Team<'static> {
        Team {
            index: 0,
            size: 1,
            state: None,
        }
    }

    /// This member's number, `0..size()`; the caller of [`Pool::run`] is member 0.
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// This member's share `[start, end)` of `0..total`, in units of `granule` (the last share takes the
    /// remainder), so that shares are contiguous, cover everything and differ by at most one granule.
    pub fn share(&self, total: usize, granule: usize) -> std::ops::Range<usize> {
        share(total, granule, self.index, self.size)
    }

    /// Waits until every member has called `barrier` as often as this one; what they wrote before is then
    /// visible here. Panics if another member panicked, so that nobody waits for it forever.
    pub fn barrier(&self) {
        let Some(state) = self.state else {
            return;
        };
        let generation = state.generation.load(SeqCst);
        if state.arrived.fetch_add(1, SeqCst) + 1 == self.size {
            state.arrived.store(0, SeqCst);
            state.generation.fetch_add(1, SeqCst);
            state.event.notify();
        } else {
            state.event.wait(BARRIER_SPIN, || {
                state.generation.load(SeqCst) != generation || state.poisoned.load(SeqCst)
            });
        }
        if state.poisoned.load(SeqCst) {
            panic!("another member of the engine's team panicked");
        }
    }

    fn poison(&self) {
        if let Some(state) = self.state {
            state.poisoned.store(true, SeqCst);
            state.event.notify();
        }
    }
}

/// Member `index` of `parts`' share of `0..total` in whole granules (see [`Team::share`]).
pub fn share(total: usize, granule: usize, index: usize, parts: usize) -> std::ops::Range<usize> {
    let granule = granule.max(1);
    let units = total.div_ceil(granule);
    let (base, extra) = (units / parts, units % parts);
    let start = index * base + index.min(extra);
    let end = start + base + usize::from(index < extra);
    (start * granule).min(total)..(end * granule).min(total)
}

/// The job of the moment, as workers read it: a type-erased pointer to the caller's closure, valid while
/// the caller waits in [`Pool::run`].
#[derive(Clone, Copy)]
struct JobRef {
    epoch: u64,
    size: usize,
    call: *const (dyn Fn(&Team) + Sync),
}

// SAFETY: the pointer is only dereferenced by the members of its job, while the caller keeps the closure
// alive (it returns only after every member has finished), and the closure is `Sync`.
unsafe impl Send for JobRef {}

struct Shared {
    epoch: AtomicU64,
    job: Mutex<Option<JobRef>>,
    go: Event,
    finished: AtomicUsize,
    done: Event,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    team: TeamState,
}

/// A persistent team of worker threads (see the module documentation).
pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    /// Held by the caller whose job runs; a second caller runs alone instead of waiting.
    busy: Mutex<()>,
}

impl Pool {
    /// A pool whose teams have up to `threads` members: the caller and `threads - 1` workers, or fewer if
    /// the system refuses to start some.
    pub fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            go: Event::default(),
            finished: AtomicUsize::new(0),
            done: Event::default(),
            panic: Mutex::new(None),
            team: TeamState::default(),
        });
        let mut workers = 0;
        for index in 1..threads.max(1) {
            let worker = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("engine-worker-{index}"))
                .spawn(move || work(&worker, index));
            match spawned {
                Ok(_) => workers += 1,
                Err(error) => {
                    eprintln!(
                        "warning: the engine runs on {} of {threads} threads: cannot start another: {error}",
                        workers + 1
                    );
                    break;
                }
            }
        }
        Pool {
            shared,
            workers,
            busy: Mutex::new(()),
        }
    }

    /// The most members a team can have.
    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Runs `job` on a team of up to `parts` members (the calling thread is member 0) and returns when all
    /// have finished. A panic on any member is re-raised here after all have left the job.
    pub fn run(&self, parts: usize, job: impl Fn(&Team) + Sync) {
        let size = parts.clamp(1, self.threads());
        // A panic re-raised below poisons the lock; it guards no data, so a poisoned lock is as good.
        let guard = match self.busy.try_lock() {
            _ if size == 1 => None,
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        let Some(_guard) = guard else {
            job(&Team::solo());
            return;
        };
        let shared = &*self.shared;
        let team = &shared.team;
        team.size.store(size, SeqCst);
        team.arrived.store(0, SeqCst);
        team.poisoned.store(false, SeqCst);
        shared.finished.store(0, SeqCst);
        let call: &(dyn Fn(&Team) + Sync) = &job;
        // SAFETY: only the lifetime is erased; the pointer is used by the members of this job alone, and
        // this function waits for all of them below before `job` goes out of scope, even on a panic.
        let call: *const (dyn Fn(&Team) + Sync) = unsafe { std::mem::transmute(call) };
        let epoch = shared.epoch.load(SeqCst) + 1;
        *lock(&shared.job) = Some(JobRef { epoch, size, call });
        shared.epoch.store(epoch, SeqCst);
        shared.go.notify();

        let member = Team {
            index: 0,
            size,
            state: Some(team),
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| job(&member)));
        if outcome.is_err() {
            member.poison();
        }
        shared
            .done
            .wait(BARRIER_SPIN, || shared.finished.load(SeqCst) == size - 1);
        let worker_panic = lock(&shared.panic).take();
        if let Err(payload) = outcome {
            resume_unwind(payload);
        }
        if let Some(payload) = worker_panic {
            resume_unwind(payload);
        }
    }
}

fn work(shared: &Shared, index: usize) {
    let mut seen = 0;
    loop {
        shared
            .go
            .wait(IDLE_SPIN, || shared.epoch.load(SeqCst) != seen);
        let Some(job) = *lock(&shared.job) else {
            continue;
        };
        seen = job.epoch;
        if index >= job.size {
            continue;
        }
        let member = Team {
            index,
            size: job.size,
            state: Some(&shared.team),
        };
        // SAFETY: see `JobRef`: the caller of this epoch waits for this member before dropping the closure.
        let call = unsafe { &*job.call };
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| call(&member))) {
            member.poison();
            lock(&shared.panic).get_or_insert(payload);
        }
        shared.finished.fetch_add(1, SeqCst);
        shared.done.notify();
    }
}

/// The threads the engine may use by default: what the operating system grants this process (its CPU
/// affinity and cgroup quota).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// Starts the process-wide pool with up to `threads` members, unless it has started already; returns it.
pub fn start(threads: usize) -> &'static Pool {
    POOL.get_or_init(|| Pool::new(threads))
}

/// The process-wide pool, started with [`default_threads`] members on first use unless [`start`] came
/// first.
pub fn global() -> &'static Pool {
    POOL.get_or_init(|| Pool::new(default_threads()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn shares_cover_the_range_in_granules() {
        for (total, granule, parts) in [
            (10, 1, 3),
            (384, 16, 2),
            (100, 16, 4),
            (5, 16, 2),
            (0, 4, 3),
        ] {
            let mut next = 0;
            for index in 0..parts {
                let range = share(total, granule, index, parts);
                assert_eq!(range.start, next, "{total} {granule} {parts}");
                assert!(range.start == range.end || range.start.is_multiple_of(granule));
                next = range.end;
            }
            assert_eq!(next, total);
        }
    }

    #[test]
    fn every_member_runs_and_barriers_order_the_steps() {
        let pool = Pool::new(3);
        let cells: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
        for round in 1..200 {
            pool.run(3, |team| {
                cells[team.index()].store(round, SeqCst);
                team.barrier();
                // After the barrier every member sees every member's write.
                for cell in &cells[..team.size()] {
                    assert_eq!(cell.load(SeqCst), round);
                }
                team.barrier();
            });
        }
    }

    #[test]
    fn a_panicking_member_fails_the_job_not_the_pool() {
        let pool = Pool::new(2);
        for bad in [0, 1] {
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                pool.run(2, |team| {
                    if team.index() == bad {
                        panic!("member {bad} fails");
                    }
                    team.barrier();
                })
            }));
            assert!(outcome.is_err());
        }
        let count = AtomicUsize::new(0);
        pool.run(2, |team| {
            team.barrier();
            count.fetch_add(1, SeqCst);
        });
        assert_eq!(count.load(SeqCst), pool.threads());
    }

    #[test]
    fn a_busy_pool_runs_the_second_caller_alone() {
        let pool = Pool::new(2);
        let inner = AtomicUsize::new(0);
        pool.run(2, |team| {
            if team.index() == 0 {
                pool.run(2, |nested| {
                    assert_eq!(nested.size(), 1);
                    inner.fetch_add(1, SeqCst);
                });
            }
            team.barrier();
        });
        assert_eq!(inner.load(SeqCst), 1);
    }
}
