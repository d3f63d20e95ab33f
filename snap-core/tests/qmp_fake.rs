//! The QMP client against a fake QMP server on a real unix socket: unknown events and fields,
//! replies out of order, error replies, garbage on the wire, a peer that hangs up or never answers.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use snap_core::ErrorKind;
use snap_core::qmp::{QmpClient, QmpConfig, QmpError, qapi::qmp, wait_for_event};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::UnixListener;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::task::JoinHandle;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "fake"}, "capabilities": ["oob"]}}"#;
const SECOND: Duration = Duration::from_secs(1);

/// The server's side of one connection.
struct Peer {
    lines: Lines<BufReader<OwnedReadHalf>>,
    w: OwnedWriteHalf,
}

impl Peer {
    /// The next command the client sent.
    async fn recv(&mut self) -> Value {
        let line = self
            .lines
            .next_line()
            .await
            .unwrap()
            .expect("client closed");
        serde_json::from_str(&line).unwrap()
    }

    /// Sends one raw line.
    async fn send(&mut self, line: &str) {
        self.w.write_all(line.as_bytes()).await.unwrap();
        self.w.write_all(b"\n").await.unwrap();
        self.w.flush().await.unwrap();
    }

    async fn reply(&mut self, cmd: &Value, ret: Value) {
        let msg = json!({"return": ret, "id": cmd["id"]});
        self.send(&msg.to_string()).await;
    }
}

struct Server {
    _dir: tempfile::TempDir,
    path: PathBuf,
    task: JoinHandle<()>,
}

/// A fake QMP server: greeting, `qmp_capabilities` answered, then `script` runs.
async fn serve<F, Fut>(script: F) -> Server
where
    F: FnOnce(Peer) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    serve_raw(|mut peer| async move {
        peer.send(GREETING).await;
        let caps = peer.recv().await;
        assert_eq!(caps["execute"], "qmp_capabilities");
        assert!(caps["id"].is_u64());
        peer.reply(&caps, json!({})).await;
        script(peer).await;
    })
    .await
}

/// A fake server that runs `script` from the first byte.
async fn serve_raw<F, Fut>(script: F) -> Server
where
    F: FnOnce(Peer) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, w) = stream.into_split();
        let peer = Peer {
            lines: BufReader::new(r).lines(),
            w,
        };
        script(peer).await;
    });
    Server {
        _dir: dir,
        path,
        task,
    }
}

fn version_return() -> Value {
    json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "fake", "future-field": [1, 2]})
}

#[tokio::test]
async fn unknown_event_and_unknown_fields_do_not_break_the_connection() {
    let server = serve(|mut peer| async move {
        let cmd = peer.recv().await;
        assert_eq!(cmd["execute"], "query-version");
        assert_eq!(cmd["arguments"], json!({}));
        peer.send(r#"{"event": "SNAPCTL_FUTURE_EVENT", "data": {"x": 1}, "timestamp": {"seconds": 1700000000, "microseconds": 42}, "future-top": "kept"}"#).await;
        let reply = json!({"return": version_return(), "id": cmd["id"], "future-top": true});
        peer.send(&reply.to_string()).await;
        let cmd = peer.recv().await;
        assert_eq!(cmd["execute"], "query-named-block-nodes");
        assert_eq!(cmd["arguments"], json!({"flat": true}));
        peer.reply(&cmd, json!([])).await;
        // Keep the socket open until the client is done.
        let _ = peer.lines.next_line().await;
    })
    .await;

    let client = QmpClient::connect(&server.path, SECOND).await.unwrap();
    assert_eq!(client.greeting().qemu_version(), Some((10, 0, 2)));
    assert_eq!(client.greeting().capabilities, vec![json!("oob")]);
    let mut events = client.subscribe();

    let v = client.execute(qmp::query_version {}).await.unwrap();
    assert_eq!((v.qemu.major, v.qemu.minor, v.qemu.micro), (10, 0, 2));
    let nodes = client
        .execute(qmp::query_named_block_nodes { flat: Some(true) })
        .await
        .unwrap();
    assert!(nodes.is_empty());

    let ev = events.try_recv().unwrap();
    assert_eq!(ev.name, "SNAPCTL_FUTURE_EVENT");
    assert_eq!(ev.data, json!({"x": 1}));
    let ts = ev.timestamp.unwrap();
    assert_eq!((ts.seconds, ts.microseconds), (1_700_000_000, 42));
    assert_eq!(ev.extra["future-top"], "kept");
    // Not an event the qapi crate knows: typed decoding says "not this one".
    assert!(ev.decode::<qmp::STOP>().is_none());
    assert!(client.is_open());
    drop(client);
    server.task.await.unwrap();
}

#[tokio::test]
async fn concurrent_commands_answered_in_reverse_order_are_matched_by_id() {
    let server = serve(|mut peer| async move {
        let a = peer.recv().await;
        let b = peer.recv().await;
        peer.reply(&b, json!({"who": b["execute"]})).await;
        peer.reply(&a, json!({"who": a["execute"]})).await;
        let _ = peer.lines.next_line().await;
    })
    .await;
    let client = QmpClient::connect(&server.path, SECOND).await.unwrap();
    let (a, b) = tokio::join!(
        client.execute_raw("cmd-a", Value::Null),
        client.execute_raw("cmd-b", json!({"k": 1})),
    );
    assert_eq!(a.unwrap(), json!({"who": "cmd-a"}));
    assert_eq!(b.unwrap(), json!({"who": "cmd-b"}));
}

#[tokio::test]
async fn error_reply_becomes_a_command_error_and_the_connection_lives_on() {
    let server = serve(|mut peer| async move {
        let cmd = peer.recv().await;
        assert_eq!(
            cmd["arguments"],
            json!({"device": "nosuch", "name": "s1"})
        );
        let reply = json!({"error": {"class": "DeviceNotFound", "desc": "Cannot find device='nosuch' nor node-name='nosuch'", "future": 1}, "id": cmd["id"]});
        peer.send(&reply.to_string()).await;
        let cmd = peer.recv().await;
        peer.reply(&cmd, json!({})).await;
        let _ = peer.lines.next_line().await;
    })
    .await;
    let client = QmpClient::connect(&server.path, SECOND).await.unwrap();
    let err = client
        .execute(qmp::blockdev_snapshot_internal_sync(
            qmp::BlockdevSnapshotInternal {
                device: "nosuch".into(),
                name: "s1".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Command);
    assert!(
        err.to_string()
            .contains("QMP DeviceNotFound: Cannot find device='nosuch' nor node-name='nosuch'"),
        "{err}"
    );
    let q = QmpError::of(&err).unwrap();
    assert_eq!(q.class, "DeviceNotFound");
    assert_eq!(q.command, "blockdev-snapshot-internal-sync");
    client.execute_raw("next", Value::Null).await.unwrap();
}

#[tokio::test]
async fn garbage_on_the_wire_is_skipped() {
    let server = serve(|mut peer| async move {
        let cmd = peer.recv().await;
        for junk in [
            "{not json at all",
            "",
            "   ",
            "[1, 2, 3]",
            "\"a string\"",
            "{\"neither\": \"event nor reply\"}",
            "{\"return\": {}, \"id\": 999999}",
            "{\"return\": {}}",
            "{\"return\": {}, \"id\": \"not-ours\"}",
            "{\"event\": 5}",
            "{\"QMP\": {}}",
        ] {
            peer.send(junk).await;
        }
        // Over the client's 1 KiB limit: skipped without being buffered whole.
        peer.send(&format!(
            "{{\"return\": \"{}\", \"id\": {}}}",
            "x".repeat(100_000),
            cmd["id"]
        ))
        .await;
        peer.w.write_all(&[0xff, 0xfe, b'\n']).await.unwrap();
        peer.reply(&cmd, json!({"ok": true})).await;
        let _ = peer.lines.next_line().await;
    })
    .await;
    let config = QmpConfig {
        connect_timeout: SECOND,
        command_timeout: Duration::from_secs(5),
        max_line: 1024,
        ..QmpConfig::default()
    };
    let client = QmpClient::connect_with(&server.path, config).await.unwrap();
    let mut events = client.subscribe();
    let v = client.execute_raw("cmd", Value::Null).await.unwrap();
    assert_eq!(v, json!({"ok": true}));
    assert!(events.try_recv().is_err(), "no junk became an event");
    assert!(client.is_open());
}

#[tokio::test]
async fn server_closing_mid_command_fails_pending_and_later_calls() {
    let server = serve(|mut peer| async move {
        let _cmd = peer.recv().await;
        // Hang up without answering.
    })
    .await;
    let client = QmpClient::connect(&server.path, SECOND).await.unwrap();
    let mut events = client.subscribe();
    let err = client
        .execute_raw("query-status", Value::Null)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(err.to_string().contains("connection closed"), "{err}");
    assert!(err.to_string().contains("query-status"), "{err}");
    assert!(!client.is_open());

    let start = std::time::Instant::now();
    let err = client.execute(qmp::query_version {}).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(err.to_string().contains("connection closed"), "{err}");
    assert!(start.elapsed() < SECOND, "later calls fail at once");

    let err = wait_for_event(&mut events, |_| true, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("closed"), "{err}");
    let err = client
        .wait_event(|_| true, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("closed"), "{err}");
}

#[tokio::test]
async fn a_server_that_never_answers_hits_the_timeout_and_late_replies_are_dropped() {
    let server = serve(|mut peer| async move {
        let slow = peer.recv().await;
        let next = peer.recv().await;
        // The first command's answer arrives after the client gave up on it.
        peer.reply(&slow, json!("late")).await;
        peer.reply(&next, json!("next")).await;
        let _ = peer.lines.next_line().await;
    })
    .await;
    let mut client = QmpClient::connect(&server.path, SECOND).await.unwrap();
    client.set_command_timeout(Duration::from_millis(200));
    let start = std::time::Instant::now();
    let err = client
        .execute_raw("slow-command", Value::Null)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(
        err.to_string()
            .contains("QMP command slow-command timed out"),
        "{err}"
    );
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert!(start.elapsed() < Duration::from_secs(5));
    let v = client
        .execute_raw_timeout("next-command", Value::Null, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(v, json!("next"));
}

#[tokio::test]
async fn events_are_waited_for_and_decoded() {
    let server = serve(|mut peer| async move {
        let cmd = peer.recv().await;
        peer.reply(&cmd, json!({})).await;
        peer.send(r#"{"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 0}}"#)
            .await;
        peer.send(r#"{"event": "JOB_STATUS_CHANGE", "data": {"id": "j1", "status": "concluded"}, "timestamp": {"seconds": 2, "microseconds": 0}}"#)
            .await;
        let _ = peer.lines.next_line().await;
    })
    .await;
    let client = QmpClient::connect(&server.path, SECOND).await.unwrap();
    let mut events = client.subscribe();
    client.execute_raw("cont", Value::Null).await.unwrap();
    let ev = wait_for_event(&mut events, |e| e.name == "JOB_STATUS_CHANGE", SECOND)
        .await
        .unwrap();
    let job = ev.decode::<qmp::JOB_STATUS_CHANGE>().unwrap().unwrap();
    assert_eq!(job.id, "j1");
    assert!(matches!(job.status, qmp::JobStatus::concluded));

    // Nothing more arrives: the helper times out cleanly.
    let err = client
        .wait_event(|_| true, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
}

#[tokio::test]
async fn connect_refuses_a_non_qmp_peer_and_times_out_on_a_silent_one() {
    let hmp = serve_raw(|mut peer| async move {
        peer.send("QEMU 10.0.2 monitor - type 'help' for more information")
            .await;
        let _ = peer.lines.next_line().await;
    })
    .await;
    let err = QmpClient::connect(&hmp.path, SECOND).await.unwrap_err();
    assert!(err.to_string().contains("not a QMP greeting"), "{err}");
    assert_eq!(err.path(), Some(hmp.path.as_path()));

    let silent = serve_raw(|peer| async move {
        // Hold the write half too: dropping it would shut the socket's write side (EOF).
        let Peer { mut lines, w } = peer;
        let _ = lines.next_line().await;
        drop(w);
    })
    .await;
    let err = QmpClient::connect(&silent.path, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(err.to_string().contains("timed out"), "{err}");

    let err = QmpClient::connect(silent.path.with_file_name("absent.sock"), SECOND)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn capabilities_refused_is_a_connect_error() {
    let server = serve_raw(|mut peer| async move {
        peer.send(GREETING).await;
        let caps = peer.recv().await;
        let reply = json!({"error": {"class": "GenericError", "desc": "no"}, "id": caps["id"]});
        peer.send(&reply.to_string()).await;
        let _ = peer.lines.next_line().await;
    })
    .await;
    let err = QmpClient::connect(&server.path, SECOND).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Command);
    assert!(
        err.to_string()
            .contains("QMP capabilities negotiation: qmp_capabilities: QMP GenericError: no"),
        "{err}"
    );
}

#[tokio::test]
async fn a_cancelled_command_does_not_disturb_the_next_one() {
    let server = serve(|mut peer| async move {
        let first = peer.recv().await;
        let second = peer.recv().await;
        peer.reply(&first, json!(1)).await;
        peer.reply(&second, json!(2)).await;
        let _ = peer.lines.next_line().await;
    })
    .await;
    let client = QmpClient::connect(&server.path, SECOND).await.unwrap();
    // The caller gives up on its own (select/timeout around the call).
    let r = tokio::time::timeout(
        Duration::from_millis(100),
        client.execute_raw("first", Value::Null),
    )
    .await;
    assert!(r.is_err());
    assert_eq!(
        client.execute_raw("second", Value::Null).await.unwrap(),
        json!(2)
    );
    assert!(client.is_open());
}
