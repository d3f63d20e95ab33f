//! A minimal client of the QEMU guest agent (qemu-ga) on its virtio-serial socket: sync, file
//! system freeze and thaw.
//!
//! The channel has no greeting and may hold stale replies from an earlier client, so every
//! session starts with `guest-sync-delimited`: the agent answers with a 0xFF byte (which also
//! resets its parser) and then the id we sent; everything before that is discarded. When no
//! agent runs in the guest nothing answers, which is reported as such within the timeout.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use snap_core::{Error, ErrorKind, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Longest reply line accepted from the agent.
const MAX_LINE: usize = 1 << 20;

/// A connected, synchronised guest agent.
#[derive(Debug)]
pub struct GuestAgent {
    stream: BufReader<UnixStream>,
    path: PathBuf,
}

impl GuestAgent {
    /// Connects to the agent socket and synchronises; an error (kind Unsupported) says no agent
    /// answered within `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<GuestAgent> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| Error::io("connect to the guest agent socket", e).with_path(path))?;
        let mut agent = GuestAgent {
            stream: BufReader::new(stream),
            path: path.to_path_buf(),
        };
        let id = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64 & 0x7fff_ffff)
            .unwrap_or(4711);
        let synced = tokio::time::timeout(timeout, agent.sync(id)).await;
        match synced {
            Ok(Ok(())) => Ok(agent),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "no guest agent answered on {} within {timeout:?} (is qemu-ga running in the guest?)",
                    path.display()
                ),
            )),
        }
    }

    async fn send(&mut self, command: &str, args: Option<Value>) -> Result<()> {
        let mut msg = json!({"execute": command});
        if let (Some(args), Some(obj)) = (args, msg.as_object_mut()) {
            obj.insert("arguments".into(), args);
        }
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        self.stream
            .get_mut()
            .write_all(&line)
            .await
            .map_err(|e| Error::io(format!("guest agent: send {command}"), e).with_path(&self.path))
    }

    async fn read_line(&mut self) -> Result<Value> {
        let mut buf = Vec::new();
        loop {
            let n = (&mut self.stream)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut buf)
                .await
                .map_err(|e| Error::io("guest agent: read", e).with_path(&self.path))?;
            if n == 0 {
                return Err(Error::new(ErrorKind::Io, "guest agent: connection closed"));
            }
            match decode_line(&buf) {
                None => buf.clear(),
                Some(reply) => return reply,
            }
        }
    }

    async fn sync(&mut self, id: u64) -> Result<()> {
        self.send("guest-sync-delimited", Some(json!({"id": id})))
            .await?;
        loop {
            if is_sync_reply(&self.read_line().await?, id) {
                return Ok(());
            }
        }
    }

    /// Runs `command` and returns its `return` value (an error reply becomes an error).
    pub async fn execute(
        &mut self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let exchange = async {
            self.send(command, args).await?;
            loop {
                match classify_reply(&self.read_line().await?) {
                    AgentReply::Return(value) => return Ok(value.clone()),
                    AgentReply::Error(desc) => {
                        return Err(Error::new(
                            ErrorKind::Command,
                            format!("guest agent: {command} failed: {desc}"),
                        ));
                    }
                    AgentReply::Other => {}
                }
            }
        };
        tokio::time::timeout(timeout, exchange).await.map_err(|_| {
            Error::new(
                ErrorKind::Io,
                format!("guest agent: {command} got no answer within {timeout:?}"),
            )
        })?
    }

    /// Freezes the guest's file systems; returns how many were frozen.
    pub async fn freeze(&mut self) -> Result<u64> {
        let frozen = self
            .execute("guest-fsfreeze-freeze", None, Duration::from_secs(60))
            .await?;
        Ok(frozen.as_u64().unwrap_or(0))
    }

    /// Thaws the guest's file systems.
    pub async fn thaw(&mut self) -> Result<u64> {
        let thawed = self
            .execute("guest-fsfreeze-thaw", None, Duration::from_secs(60))
            .await?;
        Ok(thawed.as_u64().unwrap_or(0))
    }
}

/// Decodes one line read from the agent (up to and including its newline, or cut at the length
/// limit). Pure; never panics. Everything up to the last 0xFF byte is dropped (the delimiter
/// `guest-sync-delimited` asks for, and whatever stale bytes came before it); `None` when
/// nothing but whitespace is left (the caller reads the next line); otherwise the JSON value,
/// or an [`ErrorKind::Command`] error for text that is not JSON.
pub fn decode_line(line: &[u8]) -> Option<Result<Value>> {
    let start = line
        .iter()
        .rposition(|b| *b == 0xff)
        .map_or(0, |pos| pos + 1);
    let text = String::from_utf8_lossy(line.get(start..).unwrap_or_default());
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    Some(serde_json::from_str(text).map_err(|e| {
        Error::new(
            ErrorKind::Command,
            format!("guest agent: unreadable reply: {e}"),
        )
    }))
}

/// What a decoded agent reply is, as [`classify_reply`] sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentReply<'a> {
    /// A `return` member: the command's result.
    Return(&'a Value),
    /// An `error` member (and no `return`): its `desc`, or `"no description"`.
    Error(&'a str),
    /// Anything else (not an object, or neither member): skipped by the reader.
    Other,
}

/// Classifies a decoded reply: `return` first, then `error`, else [`AgentReply::Other`]. Pure.
pub fn classify_reply(reply: &Value) -> AgentReply<'_> {
    if let Some(value) = reply.get("return") {
        return AgentReply::Return(value);
    }
    match reply.get("error") {
        Some(err) => AgentReply::Error(
            err.get("desc")
                .and_then(Value::as_str)
                .unwrap_or("no description"),
        ),
        None => AgentReply::Other,
    }
}

/// Whether `reply` answers `guest-sync-delimited` with `id` (its `return` is that integer).
pub fn is_sync_reply(reply: &Value, id: u64) -> bool {
    matches!(classify_reply(reply), AgentReply::Return(value) if value.as_u64() == Some(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_decoded_after_the_last_delimiter() {
        assert!(decode_line(b"").is_none());
        assert!(decode_line(b" \r\n").is_none());
        assert!(decode_line(b"{\"return\": 1}\xff \n").is_none());
        let v = decode_line(b"garbage\xff{\"return\": 7}\n")
            .unwrap()
            .unwrap();
        assert!(is_sync_reply(&v, 7));
        assert!(!is_sync_reply(&v, 8));
        let err = decode_line(b"{\"return\"").unwrap().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Command);
        // Invalid UTF-8 outside the JSON text is replaced, inside a string it is kept lossy.
        let v = decode_line(b"{\"return\": \"\xc3(\"}").unwrap().unwrap();
        assert_eq!(classify_reply(&v), AgentReply::Return(&json!("\u{fffd}(")));
    }

    #[test]
    fn replies_are_classified() {
        assert_eq!(
            classify_reply(&json!({"return": {}, "error": {"desc": "x"}})),
            AgentReply::Return(&json!({}))
        );
        assert_eq!(
            classify_reply(&json!({"error": {"class": "GenericError", "desc": "frozen"}})),
            AgentReply::Error("frozen")
        );
        assert_eq!(
            classify_reply(&json!({"error": "x"})),
            AgentReply::Error("no description")
        );
        assert_eq!(classify_reply(&json!([1])), AgentReply::Other);
        assert_eq!(classify_reply(&json!({"event": "x"})), AgentReply::Other);
        assert!(!is_sync_reply(&json!({"return": -1}), 0));
    }
}
