//! The internal side of the front door: the fixed set of persistent connections to tiny_http, handing
//! whole requests to them in turn, and copying their answers back to the clients.

use super::*;

/// One persistent internal connection to tiny_http.
pub(super) struct Upstream {
    pub(super) stream: Option<UnixStream>,
    pub(super) state: UpState,
    /// Request bytes to write; `written` of them sent.
    pub(super) out: Vec<u8>,
    pub(super) written: usize,
    pub(super) interest: u32,
    /// Since when it has been unable to carry requests; `None` while it can.
    pub(super) down_since: Option<Instant>,
    pub(super) retry_at: Instant,
}

pub(super) enum UpState {
    /// Not connected.
    Down,
    /// Connected; its warm-up request is out.
    WarmingUp(ResponseFramer),
    Idle,
    Busy(Exchange),
}

/// A request on an internal connection and its answer as it comes back.
pub(super) struct Exchange {
    pub(super) client: Key,
    pub(super) framer: ResponseFramer,
    pub(super) keep_alive: bool,
    http10: bool,
    /// The client is gone: the answer is read and dropped.
    pub(super) discard: bool,
    /// The answer's head told the client that the connection closes after it.
    pub(super) closes: bool,
}

impl Upstream {
    pub(super) fn new() -> Upstream {
        let now = Instant::now();
        Upstream {
            stream: None,
            state: UpState::Down,
            out: Vec::new(),
            written: 0,
            interest: 0,
            down_since: Some(now),
            retry_at: now,
        }
    }
}

impl Door {
    /// Hands waiting requests to idle internal connections: the probe's first (on its own connection, or
    /// any idle one), then clients' in arrival order.
    pub(super) fn dispatch(&mut self) {
        while let Some(&key) = self.probe_waiting.front() {
            let idle = |u: &Upstream| matches!(u.state, UpState::Idle);
            let Some(up) = self.upstreams.iter().position(idle) else {
                break;
            };
            self.probe_waiting.pop_front();
            self.start_exchange(key, up);
        }
        while let Some(&key) = self.waiting.front() {
            let idle = |u: &Upstream| matches!(u.state, UpState::Idle);
            let Some(up) = self.upstreams.iter().skip(1).position(idle) else {
                break;
            };
            self.waiting.pop_front();
            self.start_exchange(key, up + 1);
        }
    }

    pub(super) fn start_exchange(&mut self, key: Key, up: usize) {
        let Some(c) = self.client(key) else {
            return;
        };
        let Stage::Waiting(request) = std::mem::replace(&mut c.stage, Stage::InFlight(up)) else {
            return;
        };
        let exchange = Exchange {
            client: key,
            framer: ResponseFramer::new(request.head_only()),
            keep_alive: request.keep_alive,
            http10: request.http10,
            discard: false,
            closes: false,
        };
        self.settle(key);
        let upstream = &mut self.upstreams[up];
        self.buffered += request.bytes.len();
        upstream.out = request.bytes;
        upstream.written = 0;
        upstream.state = UpState::Busy(exchange);
        self.upstream_write(up);
        self.update_upstream(up);
    }

    /// Connects the next internal connection that is down, once no other is warming up. One at a time:
    /// tiny_http's task pool can leave a connection unserved for good when two arrive before a woken
    /// thread has taken the first, and every one of its threads is held by a persistent connection.
    pub(super) fn connect_next(&mut self) {
        if self
            .upstreams
            .iter()
            .any(|u| matches!(u.state, UpState::WarmingUp(_)))
        {
            return;
        }
        let now = Instant::now();
        if let Some(up) = self
            .upstreams
            .iter()
            .position(|u| u.stream.is_none() && now >= u.retry_at)
        {
            self.connect_upstream(up);
        }
    }

    pub(super) fn connect_upstream(&mut self, up: usize) {
        let stream = match self.internal.connect() {
            Ok(stream) => stream,
            Err(e) => {
                if !would_block(&e) {
                    eprintln!("warning: cannot connect to tiny_http's internal socket: {e}");
                }
                self.upstreams[up].retry_at = Instant::now() + Duration::from_millis(100);
                return;
            }
        };
        if self.epoll.add(&stream, READ, UPSTREAM + up as u64).is_err() {
            self.upstreams[up].retry_at = Instant::now() + Duration::from_millis(100);
            return;
        }
        let upstream = &mut self.upstreams[up];
        upstream.stream = Some(stream);
        upstream.interest = READ;
        upstream.out = WARM_UP.to_vec();
        upstream.written = 0;
        upstream.state = UpState::WarmingUp(ResponseFramer::new(false));
        self.upstream_write(up);
        self.update_upstream(up);
    }

    pub(super) fn upstream_event(&mut self, up: usize, flags: u32) {
        if up >= self.upstreams.len() || self.upstreams[up].stream.is_none() {
            return;
        }
        if flags & WRITE != 0 {
            self.upstream_write(up);
        }
        if flags & (READ | HANG_UP) != 0 {
            self.upstream_read(up, flags & HANG_UP != 0);
        }
        self.update_upstream(up);
    }

    pub(super) fn upstream_write(&mut self, up: usize) {
        let upstream = &mut self.upstreams[up];
        let Some(stream) = &upstream.stream else {
            return;
        };
        let counted = !matches!(upstream.state, UpState::WarmingUp(_));
        while upstream.written < upstream.out.len() {
            match (&*stream).write(&upstream.out[upstream.written..]) {
                Ok(n) => {
                    upstream.written += n;
                    if counted {
                        self.buffered -= n;
                    }
                }
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.upstream_failed(up, &format!("writing: {e}")),
            }
        }
        upstream.out = Vec::new();
        upstream.written = 0;
    }

    /// Whether the client of upstream `up`'s answer has too much of it waiting already.
    pub(super) fn client_is_full(&self, up: usize) -> bool {
        let UpState::Busy(exchange) = &self.upstreams[up].state else {
            return false;
        };
        if exchange.discard {
            return false;
        }
        self.clients
            .get(exchange.client.0)
            .and_then(Option::as_ref)
            .filter(|c| c.generation == exchange.client.1)
            .is_some_and(|c| c.unsent() >= OUT_HIGH_WATER)
    }

    pub(super) fn upstream_read(&mut self, up: usize, hung_up: bool) {
        loop {
            if !hung_up && self.client_is_full(up) {
                return;
            }
            let Some(stream) = &self.upstreams[up].stream else {
                return;
            };
            let n = match (&*stream).read(&mut self.scratch) {
                Ok(0) => return self.upstream_failed(up, "tiny_http closed the connection"),
                Ok(n) => n,
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return self.upstream_failed(up, &format!("reading: {e}")),
            };
            if let Err(why) = self.take_answer(up, n) {
                return self.upstream_failed(up, &why);
            }
        }
    }

    /// Passes `n` bytes of upstream `up`'s answer (in `scratch`) on to its client.
    pub(super) fn take_answer(&mut self, up: usize, n: usize) -> Result<(), String> {
        let draining = self.shared.draining.load(Ordering::SeqCst);
        let upstream = &mut self.upstreams[up];
        match &mut upstream.state {
            UpState::WarmingUp(framer) => {
                let used =
                    framer.feed(&self.scratch[..n], &mut Vec::new(), ConnectionHeader::None)?;
                if used < n {
                    return Err("more bytes than one answer".into());
                }
                if framer.done() {
                    upstream.state = UpState::Idle;
                    upstream.down_since = None;
                    self.check_ready();
                    self.connect_next();
                }
                Ok(())
            }
            UpState::Busy(exchange) => {
                let key = exchange.client;
                let client = self
                    .clients
                    .get_mut(key.0)
                    .and_then(Option::as_mut)
                    .filter(|c| c.generation == key.1 && !exchange.discard);
                let connection = match &client {
                    _ if exchange.discard => ConnectionHeader::None,
                    Some(c)
                        if draining
                            || !exchange.keep_alive
                            || (c.read_closed && c.inbound.is_empty()) =>
                    {
                        ConnectionHeader::Close
                    }
                    Some(_) if exchange.http10 => ConnectionHeader::KeepAlive,
                    Some(_) => ConnectionHeader::None,
                    None => ConnectionHeader::None,
                };
                let had_head = exchange.framer.status.is_some();
                let mut dropped = Vec::new();
                let out = match client {
                    Some(c) => &mut c.outbound,
                    None => {
                        exchange.discard = true;
                        &mut dropped
                    }
                };
                let used = exchange.framer.feed(&self.scratch[..n], out, connection)?;
                if !had_head && exchange.framer.status.is_some() {
                    exchange.closes = connection == ConnectionHeader::Close;
                }
                if used < n {
                    return Err("more bytes than one answer".into());
                }
                let done = exchange.framer.done();
                if !exchange.discard {
                    self.client_write(key);
                }
                if done {
                    self.finish_exchange(up);
                }
                Ok(())
            }
            UpState::Idle | UpState::Down => Err("bytes when no answer was due".into()),
        }
    }

    /// The answer is complete: the internal connection is free, and the client reads on (or closes).
    pub(super) fn finish_exchange(&mut self, up: usize) {
        let UpState::Busy(exchange) =
            std::mem::replace(&mut self.upstreams[up].state, UpState::Idle)
        else {
            return;
        };
        let key = exchange.client;
        if exchange.discard {
            return;
        }
        if let Some(c) = self.client(key) {
            c.stage = Stage::Reading;
            if exchange.closes {
                c.closing = true;
                c.inbound = Vec::new();
                self.settle(key);
            }
        }
        // The client's next request may be here already (pipelining).
        self.client_progress(key);
        self.client_write(key);
        self.update_client(key);
    }

    /// The internal connection broke: its client gets a 500 if nothing of its answer was sent (or loses
    /// the connection if part was), and the connection is re-established.
    pub(super) fn upstream_failed(&mut self, up: usize, why: &str) {
        let upstream = &mut self.upstreams[up];
        if let Some(stream) = upstream.stream.take() {
            let _ = self.epoll.remove(&stream);
        }
        if !matches!(upstream.state, UpState::WarmingUp(_)) {
            self.buffered -= upstream.out.len() - upstream.written;
        }
        upstream.out = Vec::new();
        upstream.written = 0;
        upstream.interest = 0;
        // Reconnect at once after a healthy spell; while failing, ten times a second.
        let was_up = upstream.down_since.is_none();
        upstream.down_since.get_or_insert_with(Instant::now);
        upstream.retry_at = Instant::now();
        if !was_up {
            upstream.retry_at += Duration::from_millis(100);
        }
        let state = std::mem::replace(&mut upstream.state, UpState::Down);
        self.connect_next();
        let UpState::Busy(exchange) = state else {
            return;
        };
        let key = exchange.client;
        if exchange.discard {
            return;
        }
        if exchange.framer.until_close() {
            // An answer without a length ends with its connection: it is complete.
            if let Some(c) = self.client(key) {
                c.stage = Stage::Reading;
                c.closing = true;
            }
            self.client_write(key);
            return;
        }
        if exchange.framer.status.is_none() {
            eprintln!("error: an internal connection failed before its answer ({why})");
            if let Some(c) = self.client(key) {
                c.stage = Stage::Reading;
            }
            self.answer_and_close(key, &ApiError::internal());
        } else {
            eprintln!("error: an internal connection failed during an answer ({why})");
            self.close_client(key);
        }
    }

    pub(super) fn update_upstream(&mut self, up: usize) {
        let full = self.client_is_full(up);
        let upstream = &mut self.upstreams[up];
        let Some(stream) = &upstream.stream else {
            return;
        };
        let mut want = 0;
        if !full {
            want |= READ;
        }
        if upstream.written < upstream.out.len() {
            want |= WRITE;
        }
        if want != upstream.interest
            && self
                .epoll
                .modify(stream, want, UPSTREAM + up as u64)
                .is_ok()
        {
            upstream.interest = want;
        }
    }

    /// The door is ready once every internal connection has answered its warm-up. Some may be carrying
    /// clients' requests by then (clients that connect while the server starts are served at once), so
    /// busy counts as answered.
    pub(super) fn check_ready(&mut self) {
        if self.ready.is_some()
            && self
                .upstreams
                .iter()
                .all(|u| matches!(u.state, UpState::Idle | UpState::Busy(_)))
        {
            if let Some(ready) = self.ready.take() {
                let _ = ready.send(Ok(()));
            }
        }
    }
}
