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
            // Drop delimiter bytes and anything before them.
            if let Some(pos) = buf.iter().rposition(|b| *b == 0xff) {
                buf.drain(..=pos);
            }
            let text = String::from_utf8_lossy(&buf);
            let text = text.trim();
            if text.is_empty() {
                buf.clear();
                continue;
            }
            return serde_json::from_str(text).map_err(|e| {
                Error::new(
                    ErrorKind::Command,
                    format!("guest agent: unreadable reply: {e}"),
                )
            });
        }
    }

    async fn sync(&mut self, id: u64) -> Result<()> {
        self.send("guest-sync-delimited", Some(json!({"id": id})))
            .await?;
        loop {
            let reply = self.read_line().await?;
            if reply.get("return").and_then(Value::as_u64) == Some(id) {
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
                let reply = self.read_line().await?;
                if let Some(value) = reply.get("return") {
                    return Ok(value.clone());
                }
                if let Some(err) = reply.get("error") {
                    let desc = err
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no description");
                    return Err(Error::new(
                        ErrorKind::Command,
                        format!("guest agent: {command} failed: {desc}"),
                    ));
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
