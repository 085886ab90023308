//! The client side of the front door: accepting, reading and framing requests, the door's own answers,
//! writing answers back, the buffer bound and closing.

use super::*;

/// Where a client is with its current request.
pub(super) enum Stage {
    /// Reading (or waiting for) its next request.
    Reading,
    /// A whole request waits for an internal connection.
    Waiting(Request),
    /// Handed to tiny_http on this internal connection.
    InFlight(usize),
    /// Its last answer sent and its writing side shut: unread input is discarded until this instant.
    Lingering(Instant),
}

pub(super) struct Client {
    pub(super) stream: TcpStream,
    pub(super) generation: u32,
    pub(super) probe: bool,
    /// Bytes read and not yet framed.
    pub(super) inbound: Vec<u8>,
    pub(super) framer: RequestFramer,
    pub(super) stage: Stage,
    /// Bytes for the client; `written` of them already sent.
    pub(super) outbound: Vec<u8>,
    pub(super) written: usize,
    /// Close once `outbound` is sent (its last answer is in it).
    pub(super) closing: bool,
    /// The client has sent its last byte (it may still read).
    pub(super) read_closed: bool,
    /// Reading held back by the buffer bound.
    pub(super) paused: bool,
    pub(super) last_activity: Instant,
    /// When the client last took bytes of `outbound` (or when they started waiting).
    pub(super) last_write: Instant,
    /// Request bytes counted in the door's total.
    pub(super) counted: usize,
    pub(super) interest: u32,
}

impl Client {
    pub(super) fn held(&self) -> usize {
        let waiting = match &self.stage {
            Stage::Waiting(request) => request.bytes.len(),
            _ => 0,
        };
        self.inbound.len() + self.framer.buffered() + waiting
    }

    pub(super) fn wants_read(&self) -> bool {
        if self.paused || self.read_closed {
            return false;
        }
        match self.stage {
            Stage::Reading => !self.closing,
            Stage::Lingering(_) => true,
            Stage::Waiting(_) | Stage::InFlight(_) => self.inbound.len() < READ_AHEAD,
        }
    }

    pub(super) fn unsent(&self) -> usize {
        self.outbound.len() - self.written
    }
}

impl Door {
    pub(super) fn accept(&mut self) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {}
                Err(e) => {
                    // Out of descriptors or memory: stop accepting for a moment rather than spin, and
                    // say so at most every ten seconds.
                    let now = Instant::now();
                    if self
                        .accept_warned
                        .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
                    {
                        eprintln!(
                            "warning: cannot accept connections ({e}); retrying every 100 ms"
                        );
                        self.accept_warned = Some(now);
                    }
                    let _ = self.epoll.modify(listener, 0, LISTENER);
                    self.accept_paused_until = Some(Instant::now() + Duration::from_millis(100));
                    return;
                }
            }
        }
    }

    pub(super) fn admit(&mut self, stream: TcpStream, peer: SocketAddr) {
        let probe = *self
            .shared
            .probe_peer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            == Some(peer);
        let open = self.shared.open.load(Ordering::SeqCst);
        if open >= self.settings.max_connections && !probe {
            let _ = stream.set_nonblocking(true);
            let busy = self.error_response(&ApiError::too_many_connections(), ErrorShape::OpenAi);
            let _ = (&stream).write_all(&busy);
            self.metrics.record_error(503);
            return;
        }
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let _ = stream.set_nodelay(true);
        let index = self.free.pop().unwrap_or_else(|| {
            self.clients.push(None);
            self.clients.len() - 1
        });
        self.next_generation = (self.next_generation + 1) & 0x7fff_ffff;
        let generation = self.next_generation;
        let token = CLIENT | (u64::from(generation) << 32) | index as u64;
        if self.epoll.add(&stream, READ, token).is_err() {
            self.free.push(index);
            return;
        }
        let now = Instant::now();
        self.clients[index] = Some(Client {
            stream,
            generation,
            probe,
            inbound: Vec::new(),
            framer: RequestFramer::default(),
            stage: Stage::Reading,
            outbound: Vec::new(),
            written: 0,
            closing: false,
            read_closed: false,
            paused: false,
            last_activity: now,
            last_write: now,
            counted: 0,
            interest: READ,
        });
        self.shared.open.fetch_add(1, Ordering::SeqCst);
    }

    pub(super) fn client(&mut self, key: Key) -> Option<&mut Client> {
        live(&mut self.clients, key)
    }

    pub(super) fn client_event(&mut self, key: Key, flags: u32) {
        if self.client(key).is_none() {
            return;
        }
        if flags & WRITE != 0 {
            self.client_write(key);
        }
        if flags & (READ | HANG_UP) != 0 {
            self.client_read(key, flags & HANG_UP != 0);
        }
        self.update_client(key);
    }

    pub(super) fn client_read(&mut self, key: Key, hung_up: bool) {
        let bound = self.settings.max_buffered_bytes;
        let over_bound = self.buffered >= bound;
        let scratch = &mut self.scratch;
        let Some(c) = live(&mut self.clients, key) else {
            return;
        };
        if let Stage::Lingering(_) = c.stage {
            loop {
                match c.stream.read(scratch) {
                    Ok(0) => return self.close_client(key),
                    Ok(_) => {}
                    Err(e) if would_block(&e) => return,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return self.close_client(key),
                }
            }
        }
        if !c.wants_read() {
            if hung_up {
                // Both directions are gone: nothing more can be read or delivered.
                self.close_client(key);
            }
            return;
        }
        if over_bound && !c.probe {
            c.paused = true;
            self.paused.push(key);
            let now = Instant::now();
            if self
                .pause_warned
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
            {
                self.pause_warned = Some(now);
                eprintln!(
                    "warning: the front door holds {} request bytes, its bound \
                     (--max-buffered-bytes); it reads no more from clients until requests move on",
                    self.buffered
                );
            }
            return;
        }
        // A few reads per wake-up, so that one fast client cannot hold the loop, and none past the bound
        // (which one read may pass by at most the scratch buffer's size).
        let room = bound.saturating_sub(self.buffered);
        let mut taken = 0;
        for _ in 0..4 {
            match c.stream.read(scratch) {
                Ok(0) => {
                    c.read_closed = true;
                    break;
                }
                Ok(n) => {
                    c.inbound.extend_from_slice(&scratch[..n]);
                    c.last_activity = Instant::now();
                    taken += n;
                    if !c.wants_read() || (taken >= room && !c.probe) {
                        break;
                    }
                }
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.close_client(key),
            }
        }
        self.settle(key);
        self.client_progress(key);
    }

    /// Frames what the client has sent, if it is between requests: queues a whole request, answers a
    /// refused one, or closes a connection that can send no more.
    pub(super) fn client_progress(&mut self, key: Key) {
        let max_body = self.settings.max_body_bytes;
        let Some(c) = self.client(key) else {
            return;
        };
        if !matches!(c.stage, Stage::Reading) || c.closing {
            return;
        }
        let probe = c.probe;
        let progress = if c.inbound.is_empty() && !c.framer.in_progress() {
            Progress::NeedMore
        } else {
            c.framer.advance(&mut c.inbound, max_body, probe)
        };
        match progress {
            Progress::NeedMore => {
                if c.framer.wants_continue {
                    c.framer.wants_continue = false;
                    c.outbound
                        .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                    self.client_write(key);
                }
                let Some(c) = self.client(key) else {
                    return;
                };
                if c.read_closed {
                    // The client stopped sending with no whole request left: nothing to answer.
                    if c.unsent() == 0 {
                        self.close_client(key);
                    } else {
                        c.closing = true;
                    }
                    return;
                }
            }
            Progress::Complete(request) => {
                c.stage = Stage::Waiting(request);
                if probe {
                    self.probe_waiting.push_back(key);
                } else {
                    self.waiting.push_back(key);
                }
            }
            Progress::Refused(refusal) => {
                let error = match refusal {
                    Refusal::Malformed(why) => ApiError::invalid(why),
                    Refusal::HeadTooLarge => {
                        ApiError::head_too_large(http::MAX_HEAD_BYTES, http::MAX_HEADERS)
                    }
                    Refusal::BodyTooLarge => ApiError::too_large(max_body),
                };
                self.answer_and_close(key, &error);
            }
        }
        self.settle(key);
    }

    /// Answers the client's current request itself, then closes the connection (the rest of its bytes
    /// cannot be trusted to start a request).
    pub(super) fn answer_and_close(&mut self, key: Key, error: &ApiError) {
        let Some(c) = self.client(key) else {
            return;
        };
        // In the shape of the API the request was for, as a worker would have written it.
        let shape = c
            .framer
            .current()
            .map_or(ErrorShape::OpenAi, |(method, target)| {
                routes::error_shape(method, target.split('?').next().unwrap_or(""))
            });
        let response = self.error_response(error, shape);
        self.metrics.record_error(error.status);
        let Some(c) = self.client(key) else {
            return;
        };
        // The same line a worker writes, for what the door answers itself.
        let (method, target) = c.framer.current().unwrap_or(("-", "-"));
        let elapsed = c
            .framer
            .head_started
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
        eprintln!(
            "{} {} {} inputs=0 tokens=0 {:.1}ms",
            excerpt(method),
            excerpt(target),
            error.status,
            elapsed * 1000.0
        );
        c.inbound = Vec::new();
        c.framer = RequestFramer::default();
        c.stage = Stage::Reading;
        c.outbound.extend_from_slice(&response);
        c.closing = true;
        self.settle(key);
        self.client_write(key);
    }

    /// A complete response for one of the door's own answers.
    pub(super) fn error_response(&self, error: &ApiError, shape: ErrorShape) -> Vec<u8> {
        let (status, body) = shape.render(error);
        let reason = tiny_http::StatusCode(status).default_reason_phrase();
        let mut head = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (name, value) in &error.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(origin) = &self.settings.cors_allow_origin {
            head.push_str(&format!("Access-Control-Allow-Origin: {origin}\r\n"));
            if origin != "*" {
                head.push_str("Vary: Origin\r\n");
            }
        }
        head.push_str("\r\n");
        head.push_str(&body);
        head.into_bytes()
    }

    /// Sends what it can of the client's outbound bytes; closes a closing client once all are sent.
    pub(super) fn client_write(&mut self, key: Key) {
        let Some(c) = self.client(key) else {
            return;
        };
        while c.written < c.outbound.len() {
            match c.stream.write(&c.outbound[c.written..]) {
                Ok(0) => return self.close_client(key),
                Ok(n) => {
                    c.written += n;
                    c.last_write = Instant::now();
                    c.last_activity = c.last_write;
                }
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.close_client(key),
            }
        }
        if c.written == c.outbound.len() {
            c.written = 0;
            if c.outbound.capacity() > READ_AHEAD {
                c.outbound = Vec::new();
            } else {
                c.outbound.clear();
            }
            if c.closing && matches!(c.stage, Stage::Reading) {
                if c.read_closed {
                    return self.close_client(key);
                }
                let _ = c.stream.shutdown(Shutdown::Write);
                c.stage = Stage::Lingering(Instant::now() + LINGER);
                c.inbound = Vec::new();
                self.settle(key);
            }
        }
        let in_flight = match self.client(key).map(|c| &c.stage) {
            Some(Stage::InFlight(up)) => Some(*up),
            _ => None,
        };
        if let Some(up) = in_flight {
            // Room in the client's buffer again: resume reading its answer.
            self.update_upstream(up);
        }
    }

    pub(super) fn close_client(&mut self, key: Key) {
        let Some(slot) = self.clients.get_mut(key.0) else {
            return;
        };
        if slot.as_ref().is_none_or(|c| c.generation != key.1) {
            return;
        }
        let Some(c) = slot.take() else {
            return;
        };
        let _ = self.epoll.remove(&c.stream);
        self.buffered -= c.counted;
        if let Stage::InFlight(up) = c.stage {
            if let UpState::Busy(exchange) = &mut self.upstreams[up].state {
                exchange.discard = true;
            }
            self.update_upstream(up);
        }
        self.free.push(key.0);
        self.shared.open.fetch_sub(1, Ordering::SeqCst);
    }

    /// Brings the door's byte total up to date with what this client holds.
    pub(super) fn settle(&mut self, key: Key) {
        let Some(c) = self.client(key) else {
            return;
        };
        let held = c.held();
        let before = std::mem::replace(&mut c.counted, held);
        if c.inbound.is_empty() && c.inbound.capacity() > READ_AHEAD {
            c.inbound = Vec::new();
        }
        self.buffered = self.buffered + held - before;
    }

    pub(super) fn update_client(&mut self, key: Key) {
        let Some(c) = live(&mut self.clients, key) else {
            return;
        };
        let mut want = 0;
        if c.wants_read() {
            want |= READ;
        }
        if c.unsent() > 0 {
            want |= WRITE;
        }
        if want != c.interest {
            let token = CLIENT | (u64::from(c.generation) << 32) | key.0 as u64;
            if self.epoll.modify(&c.stream, want, token).is_ok() {
                c.interest = want;
            }
        }
    }

    pub(super) fn resume_paused(&mut self) {
        if self.paused.is_empty() || self.buffered >= self.settings.max_buffered_bytes {
            return;
        }
        for key in std::mem::take(&mut self.paused) {
            if let Some(c) = self.client(key) {
                c.paused = false;
            }
            self.update_client(key);
        }
    }
}

/// The client `key` names, if its slot still holds that connection (not a later one that reuses the slot).
/// A free function, so that callers can borrow the door's other fields beside it.
fn live(clients: &mut [Option<Client>], key: Key) -> Option<&mut Client> {
    clients
        .get_mut(key.0)
        .and_then(Option::as_mut)
        .filter(|c| c.generation == key.1)
}
