//! A tolerant QMP (QEMU Machine Protocol) client over a unix socket.
//!
//! The typed command and result structs come from the [`qapi`] crate (re-exported here), but its
//! stream is not used: it decodes every event into a closed enum, so one event it does not know
//! kills the connection. This client reads every line as a generic JSON value first:
//!
//! - replies (`return` / `error` with our `id`) go to the caller waiting on that id, in any order;
//! - events (`event`, `data`, `timestamp`) are broadcast to subscribers as [`Event`]s with their
//!   data kept as raw JSON, whether or not the `qapi` crate knows them;
//! - anything else (unknown messages, malformed JSON, over-long lines) is logged and skipped.
//!
//! Unknown fields anywhere are ignored (or kept as raw JSON in [`Event::extra`]); they never break
//! the connection.
//!
//! ```no_run
//! # async fn demo() -> snap_core::Result<()> {
//! use std::time::Duration;
//! use snap_core::qmp::{QmpClient, qapi::qmp};
//!
//! let qmp = QmpClient::connect("/run/qemu.qmp", Duration::from_secs(5)).await?;
//! let nodes = qmp.execute(qmp::query_named_block_nodes { flat: Some(true) }).await?;
//! for node in nodes {
//!     println!("{:?} {}", node.node_name, node.file);
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

use crate::error::{Error, ErrorKind, Result};

pub use qapi;

/// Default time a command may take before [`QmpClient::execute`] gives up on it.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Default longest line accepted from the peer; longer lines are skipped (never buffered whole).
pub const DEFAULT_MAX_LINE: usize = 16 * 1024 * 1024;

/// Default number of events buffered per subscriber before the slowest one starts losing events.
pub const DEFAULT_EVENT_CAPACITY: usize = 1024;

/// Longest excerpt of a peer's line quoted in errors and logs.
const EXCERPT: usize = 200;

/// Connection settings for [`QmpClient::connect_with`].
#[derive(Debug, Clone)]
pub struct QmpConfig {
    /// Limit for connecting, reading the greeting and negotiating capabilities.
    pub connect_timeout: Duration,
    /// Limit for each command (writing it and waiting for its reply).
    pub command_timeout: Duration,
    /// Longest line (in bytes, without the newline) accepted from the peer.
    pub max_line: usize,
    /// Events buffered per subscriber (see [`tokio::sync::broadcast`]).
    pub event_capacity: usize,
}

impl Default for QmpConfig {
    fn default() -> Self {
        QmpConfig {
            connect_timeout: Duration::from_secs(10),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            max_line: DEFAULT_MAX_LINE,
            event_capacity: DEFAULT_EVENT_CAPACITY,
        }
    }
}

/// What the server said when the connection opened (`{"QMP": {"version": ..., "capabilities": [...]}}`).
#[derive(Debug, Clone)]
pub struct Greeting {
    /// The `version` object as sent.
    pub version: Value,
    /// The `version` object decoded, when it has the expected shape.
    pub version_info: Option<qapi::qmp::VersionInfo>,
    /// The capabilities the server offers (e.g. `"oob"`), as sent.
    pub capabilities: Vec<Value>,
}

impl Greeting {
    /// QEMU's `(major, minor, micro)` version, when the greeting carried one.
    pub fn qemu_version(&self) -> Option<(i64, i64, i64)> {
        self.version_info
            .as_ref()
            .map(|v| (v.qemu.major, v.qemu.minor, v.qemu.micro))
    }
}

/// When an event happened, as QEMU stamps it (wall-clock time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventTimestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Microseconds within that second.
    pub microseconds: i64,
}

/// A QMP event, kept as raw JSON so events unknown to the `qapi` crate survive.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event name (`"JOB_STATUS_CHANGE"`, `"STOP"`, ...).
    pub name: String,
    /// The event's `data` as sent; an empty object when the event had none.
    pub data: Value,
    /// The event's `timestamp`, when present and well-formed.
    pub timestamp: Option<EventTimestamp>,
    /// Any other top-level members of the message, kept as sent.
    pub extra: Map<String, Value>,
}

impl Event {
    /// Decodes the data into the `qapi` crate's struct for event `E`: `None` when this event is
    /// another one, an error when the name matches but the data does not fit the struct.
    pub fn decode<E: qapi::Event>(&self) -> Option<Result<E>> {
        if self.name != E::NAME {
            return None;
        }
        Some(E::deserialize(&self.data).map_err(|e| {
            Error::new(
                ErrorKind::Unsupported,
                format!(
                    "QMP event {}: data does not match the expected type: {e}",
                    self.name
                ),
            )
        }))
    }
}

/// An `error` reply from the QMP server: its class and description, as sent.
///
/// Errors from [`QmpClient::execute`] for such replies have kind [`ErrorKind::Command`] and carry
/// this as their source; [`QmpError::of`] gets it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// The command that failed.
    pub command: String,
    /// The QMP error class (`"GenericError"`, `"CommandNotFound"`, `"DeviceNotFound"`, ...).
    pub class: String,
    /// The human-readable description.
    pub desc: String,
}

impl QmpError {
    /// The QMP error reply behind `err`, if `err` came from one.
    pub fn of(err: &Error) -> Option<&QmpError> {
        std::error::Error::source(err).and_then(|s| s.downcast_ref::<QmpError>())
    }

    fn into_error(self) -> Error {
        let message = format!("{}: QMP {}: {}", self.command, self.class, self.desc);
        Error::new(ErrorKind::Command, message).with_source(self)
    }
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QMP {}: {}", self.class, self.desc)
    }
}

impl std::error::Error for QmpError {}

/// What the reader task hands to a waiting caller.
#[derive(Debug)]
enum Reply {
    Return(Value),
    Error { class: String, desc: String },
    Closed(String),
}

/// State shared between the client and its reader task.
#[derive(Debug, Default)]
struct Pending {
    waiting: HashMap<u64, oneshot::Sender<Reply>>,
    /// Why the connection is unusable, once it is.
    closed: Option<String>,
}

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<Pending>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A poisoned lock only means another thread panicked while holding it; the map is still
        // consistent (every operation on it is a single insert/remove).
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks the connection closed (first reason wins) and fails every waiting caller.
    fn close(&self, reason: &str) {
        let waiting = {
            let mut p = self.lock();
            if p.closed.is_none() {
                p.closed = Some(reason.to_string());
            }
            std::mem::take(&mut p.waiting)
        };
        for (_, tx) in waiting {
            let _ = tx.send(Reply::Closed(reason.to_string()));
        }
    }
}

/// A connected QMP client. Commands may be issued concurrently from many tasks (`&self`);
/// replies are matched to them by id. Dropping the client closes the connection.
#[derive(Debug)]
pub struct QmpClient {
    path: PathBuf,
    greeting: Greeting,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    shared: Arc<Shared>,
    events: broadcast::WeakSender<Event>,
    next_id: AtomicU64,
    command_timeout: Duration,
    reader: JoinHandle<()>,
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Removes a caller's entry from the pending map if it gives up (timeout, cancellation).
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().waiting.remove(&self.id);
    }
}

/// Marks the connection unusable if a command line was only partly written (the caller's future
/// was dropped or timed out mid-write): the peer would misparse everything after it.
struct WriteGuard<'a> {
    client: &'a QmpClient,
    done: bool,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.client
                .poison("a command was interrupted while being written");
        }
    }
}

impl QmpClient {
    /// Connects to the QMP socket at `path`, reads the greeting and negotiates capabilities
    /// (none are enabled), all within `timeout`. Commands then time out after
    /// [`DEFAULT_COMMAND_TIMEOUT`].
    pub async fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<QmpClient> {
        let config = QmpConfig {
            connect_timeout: timeout,
            ..QmpConfig::default()
        };
        Self::connect_with(path, config).await
    }

    /// Like [`connect`](Self::connect) with every setting given.
    pub async fn connect_with(path: impl AsRef<Path>, config: QmpConfig) -> Result<QmpClient> {
        let path = path.as_ref().to_path_buf();
        let timeout = config.connect_timeout;
        match tokio::time::timeout(timeout, Self::connect_inner(&path, config)).await {
            Ok(result) => result.map_err(|e| e.with_path(&path)),
            Err(_) => Err(Error::new(
                ErrorKind::Io,
                format!(
                    "QMP connect timed out after {timeout:?} (no greeting or capabilities reply)"
                ),
            )
            .with_path(&path)),
        }
    }

    async fn connect_inner(path: &Path, config: QmpConfig) -> Result<QmpClient> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| Error::io("connect to QMP socket", e))?;
        let (read, write) = stream.into_split();
        let mut reader = BufReader::with_capacity(64 * 1024, read);
        let max_line = config.max_line.max(1);
        let mut buf = Vec::new();

        let greeting = match read_line(&mut reader, &mut buf, max_line)
            .await
            .map_err(|e| Error::io("read QMP greeting", e))?
        {
            LineRead::Line => parse_greeting(&buf)?,
            LineRead::TooLong(n) => {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!("QMP greeting is {n} bytes, over the {max_line}-byte limit"),
                ));
            }
            LineRead::Eof => {
                return Err(Error::new(
                    ErrorKind::Io,
                    "QMP socket closed before the greeting",
                ));
            }
        };

        let (events_tx, _) = broadcast::channel(config.event_capacity.max(1));
        let events = events_tx.downgrade();
        let shared = Arc::new(Shared::default());
        let reader = tokio::spawn(reader_task(
            reader,
            buf,
            max_line,
            Arc::clone(&shared),
            events_tx,
        ));
        let client = QmpClient {
            path: path.to_path_buf(),
            greeting,
            writer: tokio::sync::Mutex::new(write),
            shared,
            events,
            next_id: AtomicU64::new(1),
            command_timeout: config.command_timeout,
            reader,
        };
        client
            .execute(qapi::qmp::qmp_capabilities { enable: None })
            .await
            .map_err(|e| e.context("QMP capabilities negotiation"))?;
        Ok(client)
    }

    /// The greeting the server sent.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// The socket path this client connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The per-command timeout used by [`execute`](Self::execute) and
    /// [`execute_raw`](Self::execute_raw).
    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    /// Sets the per-command timeout used by [`execute`](Self::execute) and
    /// [`execute_raw`](Self::execute_raw).
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.command_timeout = timeout;
    }

    /// Whether the connection is still usable (the peer has not closed it, no read or write
    /// failed).
    pub fn is_open(&self) -> bool {
        self.shared.lock().closed.is_none()
    }

    /// Runs a typed command from the `qapi` crate and decodes its `return` value.
    ///
    /// Errors: [`ErrorKind::Command`] for a QMP `error` reply (see [`QmpError::of`]);
    /// [`ErrorKind::Io`] for a timeout or a closed connection; [`ErrorKind::Unsupported`] when the
    /// command ran but its reply does not fit `C::Ok` (use [`execute_raw`](Self::execute_raw)).
    pub async fn execute<C: qapi::Command>(&self, cmd: C) -> Result<C::Ok> {
        self.execute_timeout(cmd, self.command_timeout).await
    }

    /// [`execute`](Self::execute) with its own timeout.
    pub async fn execute_timeout<C: qapi::Command>(
        &self,
        cmd: C,
        timeout: Duration,
    ) -> Result<C::Ok> {
        let args = serde_json::to_value(&cmd).map_err(|e| {
            Error::invalid(format!(
                "QMP command {}: cannot encode arguments: {e}",
                C::NAME
            ))
        })?;
        let value = self.run(C::NAME, args, timeout).await?;
        decode_return::<C::Ok>(C::NAME, value)
    }

    /// Runs a command by name with raw JSON arguments (for commands the `qapi` crate lacks or
    /// describes wrongly) and returns the raw `return` value. `args` of `Value::Null` sends no
    /// arguments. Errors as for [`execute`](Self::execute).
    pub async fn execute_raw(&self, name: &str, args: Value) -> Result<Value> {
        self.run(name, args, self.command_timeout).await
    }

    /// [`execute_raw`](Self::execute_raw) with its own timeout.
    pub async fn execute_raw_timeout(
        &self,
        name: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value> {
        self.run(name, args, timeout).await
    }

    /// A receiver of every event from now on (each subscriber gets its own copy). After the
    /// connection closes, the receiver yields the events already buffered and then
    /// [`broadcast::error::RecvError::Closed`].
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        match self.events.upgrade() {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(1);
                drop(tx);
                rx
            }
        }
    }

    /// Waits for the first event, from now on, that `filter` accepts. Events sent before this
    /// call are not seen: to wait for an event a command triggers, [`subscribe`](Self::subscribe)
    /// before running the command and use [`wait_for_event`].
    pub async fn wait_event<F>(&self, filter: F, timeout: Duration) -> Result<Event>
    where
        F: FnMut(&Event) -> bool,
    {
        let mut rx = self.subscribe();
        wait_for_event(&mut rx, filter, timeout).await
    }

    fn poison(&self, reason: &str) {
        self.shared.close(reason);
        self.reader.abort();
    }

    fn closed_error(name: &str, reason: &str) -> Error {
        Error::new(
            ErrorKind::Io,
            format!("QMP command {name}: connection closed ({reason})"),
        )
    }

    async fn run(&self, name: &str, args: Value, timeout: Duration) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::String(name.to_string()));
        match args {
            Value::Null => {}
            Value::Object(_) => {
                msg.insert("arguments".into(), args);
            }
            other => {
                return Err(Error::invalid(format!(
                    "QMP command {name}: arguments must be a JSON object, not {other}"
                )));
            }
        }
        msg.insert("id".into(), Value::from(id));
        let mut line = serde_json::to_vec(&Value::Object(msg)).map_err(|e| {
            Error::invalid(format!("QMP command {name}: cannot encode arguments: {e}"))
        })?;
        line.push(b'\n');

        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.shared.lock();
            if let Some(reason) = &p.closed {
                return Err(Self::closed_error(name, reason));
            }
            p.waiting.insert(id, tx);
        }
        let _pending = PendingGuard {
            shared: &self.shared,
            id,
        };
        tracing::trace!(command = name, id, "QMP ->");

        let exchange = async {
            {
                let mut writer = self.writer.lock().await;
                let mut guard = WriteGuard {
                    client: self,
                    done: false,
                };
                let written = async {
                    writer.write_all(&line).await?;
                    writer.flush().await
                }
                .await;
                guard.done = true;
                if let Err(e) = written {
                    let reason = format!("write failed: {e}");
                    self.poison(&reason);
                    return Err(Error::io(format!("QMP command {name}: send"), e));
                }
            }
            rx.await.map_err(|_| {
                let reason = self
                    .shared
                    .lock()
                    .closed
                    .clone()
                    .unwrap_or_else(|| "reader stopped".to_string());
                Self::closed_error(name, &reason)
            })
        };
        let reply = match tokio::time::timeout(timeout, exchange).await {
            Ok(reply) => reply?,
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!("QMP command {name} timed out after {timeout:?}"),
                ));
            }
        };
        match reply {
            Reply::Return(value) => Ok(value),
            Reply::Error { class, desc } => Err(QmpError {
                command: name.to_string(),
                class,
                desc,
            }
            .into_error()),
            Reply::Closed(reason) => Err(Self::closed_error(name, &reason)),
        }
    }
}

/// Waits on `rx` for the first event `filter` accepts, up to `timeout`. A subscriber that fell
/// behind skips the lost events (logged) and keeps waiting; a closed connection is an error.
pub async fn wait_for_event<F>(
    rx: &mut broadcast::Receiver<Event>,
    mut filter: F,
    timeout: Duration,
) -> Result<Event>
where
    F: FnMut(&Event) -> bool,
{
    let wait = async {
        loop {
            match rx.recv().await {
                Ok(event) if filter(&event) => return Ok(event),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(lost = n, "QMP event subscriber fell behind; events lost");
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(Error::new(
                        ErrorKind::Io,
                        "QMP connection closed while waiting for an event",
                    ));
                }
            }
        }
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(result) => result,
        Err(_) => Err(Error::new(
            ErrorKind::Io,
            format!("no matching QMP event within {timeout:?}"),
        )),
    }
}

fn decode_return<T: DeserializeOwned>(name: &str, value: Value) -> Result<T> {
    T::deserialize(&value).map_err(|e| {
        Error::new(
            ErrorKind::Unsupported,
            format!(
                "QMP command {name} ran, but its reply does not match the expected type ({e}): {}",
                excerpt(value.to_string().as_bytes())
            ),
        )
    })
}

fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim_end();
    if text.chars().count() > EXCERPT {
        let cut: String = text.chars().take(EXCERPT).collect();
        format!("{cut}...")
    } else {
        text.to_string()
    }
}

/// Parses the greeting a QMP server sends first (`{"QMP": {"version": ..., "capabilities":
/// [...]}}`); anything else is an [`ErrorKind::Io`] error quoting the line. Pure; never panics.
pub fn parse_greeting(line: &[u8]) -> Result<Greeting> {
    let not_qmp = || {
        Error::new(
            ErrorKind::Io,
            format!("not a QMP greeting: {}", excerpt(line)),
        )
    };
    let value: Value = serde_json::from_slice(line).map_err(|_| not_qmp())?;
    let qmp = value
        .get("QMP")
        .and_then(Value::as_object)
        .ok_or_else(not_qmp)?;
    let version = qmp.get("version").cloned().unwrap_or(Value::Null);
    let version_info = qapi::qmp::VersionInfo::deserialize(&version).ok();
    let capabilities = qmp
        .get("capabilities")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    Ok(Greeting {
        version,
        version_info,
        capabilities,
    })
}

/// The outcome of reading one line.
#[derive(Debug, PartialEq, Eq)]
enum LineRead {
    /// A full line (without its newline) is in the buffer.
    Line,
    /// A line of this many bytes was over the limit and was skipped.
    TooLong(usize),
    /// The peer closed the stream (a trailing partial line is dropped).
    Eof,
}

/// Reads one newline-terminated line into `buf`, never holding more than `max` bytes of it.
async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<LineRead> {
    buf.clear();
    let mut total = 0usize;
    let mut too_long = false;
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            if total > 0 {
                tracing::debug!(bytes = total, "QMP stream ended inside a line; dropped");
            }
            return Ok(LineRead::Eof);
        }
        let (chunk, used, end) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (avail.get(..i).unwrap_or(&[]), i + 1, true),
            None => (avail, avail.len(), false),
        };
        total = total.saturating_add(chunk.len());
        if !too_long {
            if buf.len() + chunk.len() > max {
                too_long = true;
                buf.clear();
                buf.shrink_to(64 * 1024);
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        r.consume(used);
        if end {
            return Ok(if too_long {
                LineRead::TooLong(total)
            } else {
                LineRead::Line
            });
        }
    }
}

async fn reader_task(
    mut reader: BufReader<OwnedReadHalf>,
    mut buf: Vec<u8>,
    max_line: usize,
    shared: Arc<Shared>,
    events: broadcast::Sender<Event>,
) {
    let reason = loop {
        match read_line(&mut reader, &mut buf, max_line).await {
            Ok(LineRead::Line) => dispatch(&buf, &shared, &events),
            Ok(LineRead::TooLong(n)) => {
                tracing::warn!(
                    bytes = n,
                    limit = max_line,
                    "QMP: skipped a line over the length limit"
                );
            }
            Ok(LineRead::Eof) => break "the QMP server closed the socket".to_string(),
            Err(e) => break format!("read failed: {e}"),
        }
    };
    tracing::debug!(%reason, "QMP reader stopped");
    shared.close(&reason);
}

/// One line received from a QMP server, as [`classify_line`] sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// An empty or all-whitespace line; ignored.
    Blank,
    /// A successful reply (`return`) to the command with this id.
    Return {
        /// The command's id (the client sends unsigned integers).
        id: u64,
        /// The `return` value as sent.
        value: Value,
    },
    /// An error reply (`error`) to the command with this id.
    Error {
        /// The command's id.
        id: u64,
        /// The error class (`"UnknownError"` when the reply has none).
        class: String,
        /// The description (the whole `error` value as JSON when it has none).
        desc: String,
    },
    /// A reply (`return` or `error`) without an id of ours (none, or not an unsigned
    /// integer): e.g. the server could not parse a command, so it could not echo its id.
    ReplyWithoutId,
    /// An event (an object whose `event` member is a string).
    Event(Event),
    /// An object with a `QMP` member: a greeting, which only the first line may be.
    Greeting,
    /// Valid JSON that is not an object.
    NotObject,
    /// Not valid JSON (the parser's message).
    Malformed(String),
    /// An object that is none of the above.
    Unknown,
}

/// Classifies one line received from a QMP server (without its newline). Pure: no I/O, no
/// state; never panics, whatever the bytes. The reader task routes the result: replies go to
/// the caller waiting on their id, events to subscribers, everything else to the log.
///
/// The rules, in order: a blank line is [`Message::Blank`]; bytes that are not JSON are
/// [`Message::Malformed`], JSON that is not an object [`Message::NotObject`]; an object whose
/// `event` is a string is an [`Message::Event`] (`data` missing or null becomes `{}`, a
/// `timestamp` that is not `{"seconds", "microseconds"}` integers is dropped, other members are
/// kept in [`Event::extra`]); else one with `return` or `error` is a reply — to the command
/// whose unsigned integer `id` it carries ([`Message::Return`], [`Message::Error`]), or
/// [`Message::ReplyWithoutId`]; else one with `QMP` is a [`Message::Greeting`]; anything else
/// is [`Message::Unknown`]. Unknown members never matter.
///
/// ```
/// use snap_core::qmp::{Message, classify_line};
///
/// let reply = classify_line(br#"{"return": {}, "id": 3}"#);
/// assert_eq!(reply, Message::Return { id: 3, value: serde_json::json!({}) });
/// assert!(matches!(
///     classify_line(br#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}}"#),
///     Message::Event(e) if e.name == "STOP"
/// ));
/// assert_eq!(classify_line(b"[1, 2]"), Message::NotObject);
/// ```
pub fn classify_line(line: &[u8]) -> Message {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Message::Blank;
    }
    let mut obj = match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(obj)) => obj,
        Ok(_) => return Message::NotObject,
        Err(e) => return Message::Malformed(e.to_string()),
    };

    if let Some(Value::String(_)) = obj.get("event") {
        let name = match obj.remove("event") {
            Some(Value::String(name)) => name,
            _ => return Message::Unknown,
        };
        let data = match obj.remove("data") {
            Some(Value::Null) | None => Value::Object(Map::new()),
            Some(data) => data,
        };
        let timestamp = obj
            .remove("timestamp")
            .and_then(|t| EventTimestamp::deserialize(&t).ok());
        return Message::Event(Event {
            name,
            data,
            timestamp,
            extra: obj,
        });
    }

    let id = obj.get("id").and_then(Value::as_u64);
    if let Some(value) = obj.remove("return") {
        return match id {
            Some(id) => Message::Return { id, value },
            None => Message::ReplyWithoutId,
        };
    }
    if let Some(err) = obj.remove("error") {
        let Some(id) = id else {
            return Message::ReplyWithoutId;
        };
        let field = |k: &str| err.get(k).and_then(Value::as_str).map(str::to_string);
        return Message::Error {
            id,
            class: field("class").unwrap_or_else(|| "UnknownError".to_string()),
            desc: field("desc").unwrap_or_else(|| err.to_string()),
        };
    }
    if obj.contains_key("QMP") {
        Message::Greeting
    } else {
        Message::Unknown
    }
}

/// Routes one line from the server ([`classify_line`]): a reply to its caller, an event to
/// subscribers, anything else to the log.
fn dispatch(line: &[u8], shared: &Shared, events: &broadcast::Sender<Event>) {
    let (id, reply) = match classify_line(line) {
        Message::Blank => return,
        Message::NotObject => {
            tracing::warn!(line = %excerpt(line), "QMP: skipped a message that is not an object");
            return;
        }
        Message::Malformed(error) => {
            tracing::warn!(%error, line = %excerpt(line), "QMP: skipped malformed JSON");
            return;
        }
        Message::Event(event) => {
            tracing::trace!(event = %event.name, "QMP <- event");
            // No subscribers is fine: the event is simply not wanted.
            let _ = events.send(event);
            return;
        }
        Message::Greeting => {
            tracing::warn!("QMP: skipped a second greeting");
            return;
        }
        Message::Unknown => {
            tracing::warn!(line = %excerpt(line), "QMP: skipped an unknown message");
            return;
        }
        Message::ReplyWithoutId => {
            tracing::warn!(
                line = %excerpt(line),
                "QMP: skipped a reply without an id of ours (the server could not parse a command?)"
            );
            return;
        }
        Message::Return { id, value } => (id, Reply::Return(value)),
        Message::Error { id, class, desc } => (id, Reply::Error { class, desc }),
    };
    let waiter = shared.lock().waiting.remove(&id);
    match waiter {
        Some(tx) => {
            tracing::trace!(id, "QMP <- reply");
            let _ = tx.send(reply);
        }
        None => tracing::debug!(id, "QMP: reply for a command nobody waits for (timed out?)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], max: usize) -> Vec<(LineRead, Vec<u8>)> {
        let mut r = BufReader::with_capacity(4, input);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        loop {
            let l = read_line(&mut r, &mut buf, max).await.unwrap();
            let eof = l == LineRead::Eof;
            out.push((l, buf.clone()));
            if eof {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn read_line_limits_and_splits() {
        let out = lines(b"abc\n0123456789\n\nxy\npartial", 5).await;
        assert_eq!(out[0], (LineRead::Line, b"abc".to_vec()));
        assert_eq!(out[1].0, LineRead::TooLong(10));
        assert_eq!(out[2], (LineRead::Line, Vec::new()));
        assert_eq!(out[3], (LineRead::Line, b"xy".to_vec()));
        assert_eq!(out[4].0, LineRead::Eof);
        assert_eq!(out.len(), 5);
    }

    #[test]
    fn greeting_parses_and_rejects() {
        let g = parse_greeting(
            br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"], "future": 1}}"#,
        )
        .unwrap();
        assert_eq!(g.qemu_version(), Some((10, 0, 2)));
        assert_eq!(g.capabilities, vec![Value::from("oob")]);
        let g = parse_greeting(br#"{"QMP": {"version": "weird"}}"#).unwrap();
        assert_eq!(g.qemu_version(), None);
        assert!(parse_greeting(b"QEMU 10.0.2 monitor - type 'help'").is_err());
        assert!(parse_greeting(br#"{"return": {}}"#).is_err());
    }

    #[test]
    fn dispatch_routes_and_tolerates() {
        let shared = Shared::default();
        let (tx, mut rx) = broadcast::channel(8);
        let (rtx, mut rrx) = oneshot::channel();
        shared.lock().waiting.insert(7, rtx);
        dispatch(b"{not json", &shared, &tx);
        dispatch(b"[1,2]", &shared, &tx);
        dispatch(br#"{"return": {}, "id": "foreign"}"#, &shared, &tx);
        dispatch(
            br#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#,
            &shared,
            &tx,
        );
        assert!(rrx.try_recv().is_err());
        dispatch(
            br#"{"error": {"class": "GenericError", "desc": "nope"}, "id": 7}"#,
            &shared,
            &tx,
        );
        match rrx.try_recv().unwrap() {
            Reply::Error { class, desc } => {
                assert_eq!((class.as_str(), desc.as_str()), ("GenericError", "nope"))
            }
            other => panic!("{other:?}"),
        }
        let ev = rx.try_recv().unwrap();
        assert_eq!(ev.name, "STOP");
        assert_eq!(ev.data, serde_json::json!({}));
        assert_eq!(
            ev.timestamp,
            Some(EventTimestamp {
                seconds: 1,
                microseconds: 2
            })
        );
    }

    #[test]
    fn classify_line_rules() {
        use serde_json::json;
        assert_eq!(classify_line(b""), Message::Blank);
        assert_eq!(classify_line(b" \t\r"), Message::Blank);
        assert!(matches!(classify_line(b"{not json"), Message::Malformed(_)));
        assert!(matches!(classify_line(b"\xff\xfe"), Message::Malformed(_)));
        assert_eq!(classify_line(b"42"), Message::NotObject);
        assert_eq!(classify_line(br#""event""#), Message::NotObject);
        assert_eq!(
            classify_line(br#"{"return": [1], "id": 9, "extra": true}"#),
            Message::Return {
                id: 9,
                value: json!([1])
            }
        );
        assert_eq!(
            classify_line(br#"{"error": {"class": "GenericError", "desc": "no"}, "id": 2}"#),
            Message::Error {
                id: 2,
                class: "GenericError".into(),
                desc: "no".into()
            }
        );
        assert_eq!(
            classify_line(br#"{"error": 5, "id": 2}"#),
            Message::Error {
                id: 2,
                class: "UnknownError".into(),
                desc: "5".into()
            }
        );
        for no_id in [
            &br#"{"return": {}}"#[..],
            br#"{"return": {}, "id": -1}"#,
            br#"{"return": {}, "id": "x"}"#,
            br#"{"error": {}, "id": 1.5}"#,
        ] {
            assert_eq!(classify_line(no_id), Message::ReplyWithoutId);
        }
        // An event wins over everything else; a non-string event name does not make an event.
        let Message::Event(ev) =
            classify_line(br#"{"event": "X", "return": 1, "id": 1, "data": null, "timestamp": 3}"#)
        else {
            panic!("not an event");
        };
        assert_eq!(ev.data, json!({}));
        assert_eq!(ev.timestamp, None);
        assert_eq!(ev.extra.len(), 2);
        assert_eq!(
            classify_line(br#"{"event": 1, "return": 2, "id": 3}"#),
            Message::Return {
                id: 3,
                value: json!(2)
            }
        );
        assert_eq!(classify_line(br#"{"event": 1}"#), Message::Unknown);
        assert_eq!(classify_line(br#"{"QMP": 1}"#), Message::Greeting);
        assert_eq!(
            classify_line(br#"{"return": 1, "QMP": {}}"#),
            Message::ReplyWithoutId
        );
        assert_eq!(classify_line(br#"{}"#), Message::Unknown);
    }

    #[test]
    fn qmp_error_is_recoverable_from_error() {
        let e = QmpError {
            command: "x".into(),
            class: "DeviceNotFound".into(),
            desc: "no such node".into(),
        }
        .into_error();
        assert_eq!(e.kind(), ErrorKind::Command);
        assert_eq!(e.to_string(), "x: QMP DeviceNotFound: no such node");
        assert_eq!(QmpError::of(&e).unwrap().class, "DeviceNotFound");
    }
}
