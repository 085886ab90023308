//! The batching queue between the HTTP workers and a model: it gathers tokenised inputs (texts to embed,
//! or a reranker's query–document pairs) from concurrent requests into batches bounded by a token budget, takes them round-robin across requests so that a large
//! request cannot starve small ones, runs the engine on one thread, and hands each request its vectors in
//! its own order. It never waits for a batch to fill: when the engine is idle, whatever is queued runs.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::models::{Model, ModelError, Sequence, Tokens};

use super::metrics::Metrics;

/// Why a request got no vectors.
#[derive(Debug)]
pub enum QueueError {
    /// The queue holds too many inputs already.
    Full,
    /// The request waited longer than the deadline; its remaining work was dropped.
    TimedOut,
    /// The engine failed on a batch that held one of its inputs.
    Engine(ModelError),
}

/// One request's inputs and the place its results go.
struct Pending {
    state: Mutex<PendingState>,
    done: Condvar,
}

struct PendingState {
    results: Vec<Option<Vec<f32>>>,
    missing: usize,
    error: Option<ModelError>,
    /// Set by the waiting worker when it gives up; the engine drops what is left of the request.
    abandoned: bool,
}

/// A request as the engine thread sees it.
struct Entry {
    pending: Arc<Pending>,
    inputs: Vec<Tokens>,
    next: usize,
    enqueued: Instant,
}

struct State {
    entries: VecDeque<Entry>,
    queued_inputs: usize,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    model: Arc<Model>,
    max_batch_tokens: usize,
    capacity: usize,
    metrics: Arc<Metrics>,
}

/// The queue in front of one model. Cloning gives another handle to the same queue.
#[derive(Clone)]
pub struct BatchQueue {
    shared: Arc<Shared>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind, still consistent enough to go on.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl BatchQueue {
    /// Starts the engine thread of `model`; fails (saying why) when the host allows no more threads.
    pub fn start(
        model: Arc<Model>,
        max_batch_tokens: usize,
        capacity: usize,
        metrics: Arc<Metrics>,
    ) -> Result<BatchQueue, String> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                entries: VecDeque::new(),
                queued_inputs: 0,
            }),
            work: Condvar::new(),
            model,
            max_batch_tokens: max_batch_tokens.max(1),
            capacity: capacity.max(1),
            metrics,
        });
        let engine = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(format!("engine-{}", shared.model.spec.name))
            .spawn(move || engine_loop(&engine))
            .map_err(|e| format!("cannot start the engine thread: {e}"))?;
        Ok(BatchQueue { shared })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.shared.model
    }

    /// Queues `inputs` and waits for their pooled vectors (a reranker's logits), in order, for at most
    /// `deadline`.
    pub fn embed(
        &self,
        inputs: Vec<Tokens>,
        deadline: Duration,
    ) -> Result<Vec<Vec<f32>>, QueueError> {
        let count = inputs.len();
        if count == 0 {
            return Ok(Vec::new());
        }
        let pending = Arc::new(Pending {
            state: Mutex::new(PendingState {
                results: vec![None; count],
                missing: count,
                error: None,
                abandoned: false,
            }),
            done: Condvar::new(),
        });
        {
            let mut state = lock(&self.shared.state);
            // An empty queue takes any request, so that one larger than the capacity is not refused forever.
            if state.queued_inputs > 0 && state.queued_inputs + count > self.shared.capacity {
                return Err(QueueError::Full);
            }
            state.queued_inputs += count;
            self.shared
                .metrics
                .set_queue_depth(&self.shared.model.spec.name, state.queued_inputs);
            state.entries.push_back(Entry {
                pending: Arc::clone(&pending),
                inputs,
                next: 0,
                enqueued: Instant::now(),
            });
        }
        self.shared.work.notify_one();

        let started = Instant::now();
        let mut state = lock(&pending.state);
        while state.missing > 0 && state.error.is_none() {
            let left = deadline.saturating_sub(started.elapsed());
            if left.is_zero() {
                state.abandoned = true;
                return Err(QueueError::TimedOut);
            }
            state = pending
                .done
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if let Some(error) = state.error.take() {
            return Err(QueueError::Engine(error));
        }
        Ok(state
            .results
            .iter_mut()
            .map(|r| r.take().unwrap_or_default())
            .collect())
    }
}

/// One input of a batch, and where its result goes.
struct Slot {
    pending: Arc<Pending>,
    index: usize,
    tokens: Tokens,
}

fn engine_loop(shared: &Shared) {
    loop {
        let batch = next_batch(shared);
        let sequences: Vec<Sequence> = batch.iter().map(|slot| slot.tokens.sequence()).collect();
        let tokens: usize = sequences.iter().map(|s| s.ids.len()).sum();
        // A panic inside the engine fails this batch, not the thread every later request depends on.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            shared.model.encode_sequences(&sequences)
        }))
        .unwrap_or_else(|_| Err(ModelError::internal("the engine panicked")));
        shared
            .metrics
            .record_batch(&shared.model.spec.name, batch.len(), tokens);
        match outcome {
            Ok(vectors) => {
                for (slot, vector) in batch.into_iter().zip(vectors) {
                    let mut state = lock(&slot.pending.state);
                    state.results[slot.index] = Some(vector);
                    state.missing -= 1;
                    if state.missing == 0 {
                        slot.pending.done.notify_all();
                    }
                }
            }
            Err(error) => {
                for slot in batch {
                    let mut state = lock(&slot.pending.state);
                    state.error = Some(error.clone());
                    slot.pending.done.notify_all();
                }
            }
        }
    }
}

/// Waits for work, then takes inputs round-robin across waiting requests until the token budget is spent.
fn next_batch(shared: &Shared) -> Vec<Slot> {
    let mut state = lock(&shared.state);
    loop {
        drop_abandoned(&mut state, shared);
        if !state.entries.is_empty() {
            break;
        }
        state = shared.work.wait(state).unwrap_or_else(|p| p.into_inner());
    }
    let mut batch = Vec::new();
    let mut tokens = 0;
    'fill: loop {
        let mut took = false;
        for entry in state.entries.iter_mut() {
            let Some(input) = entry.inputs.get_mut(entry.next) else {
                continue;
            };
            if !batch.is_empty() && tokens + input.ids.len() > shared.max_batch_tokens {
                break 'fill;
            }
            tokens += input.ids.len();
            if entry.next == 0 {
                shared
                    .metrics
                    .record_queue_time(&shared.model.spec.name, entry.enqueued.elapsed());
            }
            batch.push(Slot {
                pending: Arc::clone(&entry.pending),
                index: entry.next,
                tokens: std::mem::take(input),
            });
            entry.next += 1;
            took = true;
        }
        if !took {
            break;
        }
    }
    state
        .entries
        .retain(|entry| entry.next < entry.inputs.len());
    state.queued_inputs -= batch.len();
    shared
        .metrics
        .set_queue_depth(&shared.model.spec.name, state.queued_inputs);
    batch
}

fn drop_abandoned(state: &mut State, shared: &Shared) {
    let mut dropped = 0;
    state.entries.retain(|entry| {
        let abandoned = lock(&entry.pending.state).abandoned;
        if abandoned {
            dropped += entry.inputs.len() - entry.next;
        }
        !abandoned
    });
    if dropped > 0 {
        state.queued_inputs -= dropped;
        shared
            .metrics
            .set_queue_depth(&shared.model.spec.name, state.queued_inputs);
    }
}
