//! An HTTP/1.1 fault proxy on 127.0.0.1 in front of a registry. A programmable
//! plan decides per request whether it is forwarded or gets a fault. The proxy
//! can also stop listening for a while or act as a bearer token server.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Notify;

/// Largest request head read from a client.
const MAX_HEAD: usize = 64 * 1024;

/// What the proxy does with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward the request and copy the response back.
    Pass,
    /// Close the connection without a response.
    Drop,
    /// Answer with this status and an empty body.
    Status(u16),
    /// Answer 429 with `Retry-After: SECONDS`.
    TooManyRequests { retry_after_secs: u64 },
    /// Send the head and half the body, then reset the connection (RST).
    ResetMidBody,
    /// Send the head and half the body, then send nothing for this long and close.
    Stall(Duration),
    /// Announce the full Content-Length, send half the body and close (FIN).
    Truncate,
    /// Answer 206 with a Content-Range one byte off the requested range.
    WrongContentRange,
    /// Ignore Range: answer 200 with the whole blob.
    IgnoreRange,
    /// Forward, but flip the bits of one byte in the middle of the body.
    FlipByte,
    /// Wait this long, then forward the request as [`Fault::Pass`] does.
    Delay(Duration),
}

/// The parts of a request that a plan can inspect.
#[derive(Clone, Debug)]
pub struct RequestInfo {
    /// 1 for the first request the proxy received.
    pub number: u64,
    pub method: String,
    pub path: String,
    /// The Range header, if any.
    pub range: Option<String>,
}

impl RequestInfo {
    /// Returns whether the request reads bytes of a blob with a Range header.
    pub fn is_blob_range(&self) -> bool {
        self.path.contains("/blobs/") && self.range.is_some()
    }
}

pub type Plan = Arc<dyn Fn(&RequestInfo) -> Fault + Send + Sync>;

/// Bearer token server state: the proxy demands a token on `/v2/` paths.
struct TokenAuth {
    /// `Basic base64(user:password)` that the token endpoint accepts.
    basic: String,
    valid: Mutex<HashSet<String>>,
    issued: AtomicU64,
}

struct Shared {
    upstream: String,
    plan: Mutex<Plan>,
    requests: AtomicU64,
    faults: AtomicU64,
    token: Option<TokenAuth>,
    /// Wakes the accept loop to close its listener for a while.
    close: Notify,
    closed_for: Mutex<Duration>,
    http: reqwest::Client,
}

/// A running proxy; it stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FaultProxy {
    /// Starts a proxy in front of `upstream` (`HOST:PORT`, plain HTTP).
    pub fn start(upstream: &str, plan: Plan) -> FaultProxy {
        Self::start_inner(upstream, plan, None)
    }

    /// Starts a proxy that also acts as a bearer token server at `/token`,
    /// issuing tokens for `user:password` and requiring them on `/v2/`.
    pub fn start_with_token_auth(
        upstream: &str,
        plan: Plan,
        user: &str,
        password: &str,
    ) -> FaultProxy {
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let token = TokenAuth {
            basic,
            valid: Mutex::new(HashSet::new()),
            issued: AtomicU64::new(0),
        };
        Self::start_inner(upstream, plan, Some(token))
    }

    fn start_inner(upstream: &str, plan: Plan, token: Option<TokenAuth>) -> FaultProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("building the fault proxy's runtime");
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("building the fault proxy's HTTP client");
        let shared = Arc::new(Shared {
            upstream: upstream.to_string(),
            plan: Mutex::new(plan),
            requests: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            token,
            close: Notify::new(),
            closed_for: Mutex::new(Duration::ZERO),
            http,
        });
        let (listener, addr) = runtime.block_on(async {
            let listener = bind_below_ephemeral();
            let addr = listener.local_addr().expect("reading the proxy's address");
            (listener, addr)
        });
        runtime.spawn(accept_loop(listener, addr, Arc::clone(&shared)));
        FaultProxy {
            addr,
            shared,
            runtime: Some(runtime),
        }
    }

    /// Returns `127.0.0.1:PORT`, the registry host for image references.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Replaces the plan for the requests that follow.
    pub fn set_plan(&self, plan: Plan) {
        *self.shared.plan.lock().expect("plan lock") = plan;
    }

    /// Returns the number of requests received so far (token requests included).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Returns the number of requests answered with a fault so far.
    pub fn faults(&self) -> u64 {
        self.shared.faults.load(Ordering::SeqCst)
    }

    /// Returns the number of bearer tokens issued so far.
    pub fn tokens_issued(&self) -> u64 {
        self.shared
            .token
            .as_ref()
            .map_or(0, |token| token.issued.load(Ordering::SeqCst))
    }

    /// Invalidates every bearer token issued so far, as a token server does when
    /// credentials are revoked or tokens expire early.
    pub fn revoke_tokens(&self) {
        if let Some(token) = &self.shared.token {
            token.valid.lock().expect("token lock").clear();
        }
    }

    /// Closes the listening socket for `duration`, so connections are refused,
    /// then listens on the same port again.
    pub fn refuse_connections_for(&self, duration: Duration) {
        *self.shared.closed_for.lock().expect("close lock") = duration;
        self.shared.close.notify_one();
        // Give the accept loop a moment to drop the listener.
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// Binds a listener with SO_REUSEADDR, so it can bind the same port again after
/// a pause.
fn try_bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Lowest and one past the highest port the proxy picks from. They lie below
/// Linux's default ephemeral range (32768 to 60999), so while
/// `refuse_connections_for` has the port closed, no outgoing connection of
/// another test can take it as its local port and stop the proxy from
/// listening again.
const PORTS: std::ops::Range<u16> = 20000..32000;

/// Binds 127.0.0.1 at a free port in [`PORTS`], starting at a varying one.
fn bind_below_ephemeral() -> tokio::net::TcpListener {
    let span = u32::from(PORTS.end - PORTS.start);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or_default()
        ^ std::process::id();
    for step in 0..span {
        let port = PORTS.start + ((seed.wrapping_add(step)) % span) as u16;
        if let Ok(listener) = try_bind(SocketAddr::from(([127, 0, 0, 1], port))) {
            return listener;
        }
    }
    panic!("no free port for the fault proxy in 127.0.0.1:{PORTS:?}");
}

/// Listens on `addr` again after a pause, retrying for a few seconds while a
/// closing connection still uses the port.
async fn rebind(addr: SocketAddr) -> tokio::net::TcpListener {
    let mut attempts = 0;
    loop {
        match try_bind(addr) {
            Ok(listener) => return listener,
            Err(error) if attempts < 50 => {
                attempts += 1;
                eprintln!("fault proxy: binding {addr} again failed ({error}); retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("binding the fault proxy to {addr} again: {error}"),
        }
    }
}

async fn accept_loop(mut listener: tokio::net::TcpListener, addr: SocketAddr, shared: Arc<Shared>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(handle(stream, Arc::clone(&shared)));
                }
            }
            () = shared.close.notified() => {
                drop(listener);
                let pause = *shared.closed_for.lock().expect("close lock");
                tokio::time::sleep(pause).await;
                listener = rebind(addr).await;
            }
        }
    }
}

/// A parsed request head.
struct Head {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

async fn read_head(stream: &mut TcpStream) -> Option<Head> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buffer.windows(4).any(|window| window == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buffer.len() > MAX_HEAD {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buffer).to_string();
    let mut lines = text.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_string();
    let target = request_line.next()?.to_string();
    let headers = lines
        .take_while(|line| !line.is_empty())
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_string(), value.trim().to_string()))
        .collect();
    Some(Head {
        method,
        target,
        headers,
    })
}

/// An answer before faults are applied.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn empty(status: u16) -> Answer {
        Answer {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }
}

async fn handle(mut stream: TcpStream, shared: Arc<Shared>) {
    let Some(head) = read_head(&mut stream).await else {
        return;
    };
    let number = shared.requests.fetch_add(1, Ordering::SeqCst) + 1;

    if let Some(token) = &shared.token {
        if let Some(answer) = token_gate(&head, token, &stream) {
            write_answer(&mut stream, &answer, None).await;
            return;
        }
    }

    let info = RequestInfo {
        number,
        method: head.method.clone(),
        path: head.target.clone(),
        range: head.header("range").map(str::to_string),
    };
    let plan = Arc::clone(&*shared.plan.lock().expect("plan lock"));
    let mut fault = plan(&info);
    if let Fault::Delay(duration) = fault {
        tokio::time::sleep(duration).await;
        fault = Fault::Pass;
    } else if fault != Fault::Pass {
        shared.faults.fetch_add(1, Ordering::SeqCst);
    }

    match fault {
        Fault::Drop => return,
        Fault::Status(status) => {
            write_answer(&mut stream, &Answer::empty(status), None).await;
            return;
        }
        Fault::TooManyRequests { retry_after_secs } => {
            let mut answer = Answer::empty(429);
            answer
                .headers
                .push(("Retry-After".into(), retry_after_secs.to_string()));
            write_answer(&mut stream, &answer, None).await;
            return;
        }
        _ => {}
    }

    let send_range = fault != Fault::IgnoreRange;
    let mut answer = forward(&shared, &head, send_range).await;
    match fault {
        Fault::WrongContentRange => {
            if let Some((_, value)) = answer
                .headers
                .iter_mut()
                .find(|(name, _)| name.eq_ignore_ascii_case("content-range"))
            {
                *value = shift_content_range(value);
            }
            write_answer(&mut stream, &answer, None).await;
        }
        Fault::FlipByte => {
            if !answer.body.is_empty() {
                let middle = answer.body.len() / 2;
                answer.body[middle] ^= 0xff;
            }
            write_answer(&mut stream, &answer, None).await;
        }
        Fault::ResetMidBody => {
            let half = answer.body.len() / 2;
            write_answer(&mut stream, &answer, Some(half)).await;
            // SO_LINGER 0 makes close send RST instead of FIN.
            let _ = stream.set_zero_linger();
            drop(stream);
        }
        Fault::Stall(duration) => {
            let half = answer.body.len() / 2;
            write_answer(&mut stream, &answer, Some(half)).await;
            tokio::time::sleep(duration).await;
        }
        Fault::Truncate => {
            let half = answer.body.len() / 2;
            write_answer(&mut stream, &answer, Some(half)).await;
            let _ = stream.shutdown().await;
        }
        _ => write_answer(&mut stream, &answer, None).await,
    }
}

/// Answers token requests and rejects `/v2/` requests without a valid token;
/// returns `None` when the request may go on.
fn token_gate(head: &Head, token: &TokenAuth, _stream: &TcpStream) -> Option<Answer> {
    if head.target.starts_with("/token") {
        if head.header("authorization") != Some(token.basic.as_str()) {
            return Some(Answer::empty(401));
        }
        let number = token.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let value = format!("fault-proxy-token-{number}");
        token
            .valid
            .lock()
            .expect("token lock")
            .insert(value.clone());
        let mut answer = Answer::empty(200);
        answer.body = format!(r#"{{"token":"{value}","expires_in":300}}"#).into_bytes();
        answer
            .headers
            .push(("Content-Type".into(), "application/json".into()));
        return Some(answer);
    }
    let presented = head
        .header("authorization")
        .and_then(|value| value.strip_prefix("Bearer "));
    let valid =
        presented.is_some_and(|value| token.valid.lock().expect("token lock").contains(value));
    if valid {
        return None;
    }
    let host = head.header("host").unwrap_or("127.0.0.1");
    let mut answer = Answer::empty(401);
    answer.headers.push((
        "WWW-Authenticate".into(),
        format!(r#"Bearer realm="http://{host}/token",service="fault-proxy""#),
    ));
    Some(answer)
}

async fn forward(shared: &Shared, head: &Head, send_range: bool) -> Answer {
    let url = format!("http://{}{}", shared.upstream, head.target);
    let method =
        reqwest::Method::from_bytes(head.method.as_bytes()).unwrap_or(reqwest::Method::GET);
    let mut request = shared.http.request(method, url);
    for name in ["accept", "range"] {
        if name == "range" && !send_range {
            continue;
        }
        if let Some(value) = head.header(name) {
            request = request.header(name, value);
        }
    }
    let Ok(response) = request.send().await else {
        return Answer::empty(502);
    };
    let mut answer = Answer::empty(response.status().as_u16());
    for name in [
        "content-type",
        "content-range",
        "docker-content-digest",
        "location",
    ] {
        if let Some(value) = response.headers().get(name).and_then(|v| v.to_str().ok()) {
            answer.headers.push((name.to_string(), value.to_string()));
        }
    }
    answer.body = response
        .bytes()
        .await
        .map(|body| body.to_vec())
        .unwrap_or_default();
    answer
}

/// Moves `bytes A-B/T` one byte forward.
fn shift_content_range(value: &str) -> String {
    let parsed = value
        .strip_prefix("bytes ")
        .and_then(|rest| rest.split_once('/'))
        .and_then(|(range, total)| {
            let (start, end) = range.split_once('-')?;
            Some((start.parse::<u64>().ok()?, end.parse::<u64>().ok()?, total))
        });
    match parsed {
        Some((start, end, total)) => format!("bytes {}-{}/{total}", start + 1, end + 1),
        None => "bytes 0-0/1".to_string(),
    }
}

/// Writes the status line, headers and body (only `limit` bytes of it when
/// set, while Content-Length still announces all of it).
async fn write_answer(stream: &mut TcpStream, answer: &Answer, limit: Option<usize>) {
    let mut head = format!("HTTP/1.1 {} Fault Proxy\r\n", answer.status);
    for (name, value) in &answer.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        answer.body.len()
    ));
    let body = &answer.body[..limit.unwrap_or(answer.body.len()).min(answer.body.len())];
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body).await;
    let _ = stream.flush().await;
    if limit.is_none() {
        let _ = stream.shutdown().await;
    }
}
