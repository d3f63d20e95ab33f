//! QMP and guest-agent message fuzzing: arbitrary bytes as lines received from a QMP server (the
//! whole input, and each newline-separated line as the reader task sees them) go through
//! `classify_line` and `parse_greeting`, and as a guest-agent line through `qga::decode_line` and
//! `classify_reply`. Nothing may panic, and what is classified must survive re-encoding: a reply
//! or event written back as JSON is classified the same way again (same kind, id, event name and
//! timestamp, error class and description).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};
use snap_core::qmp::{Message, classify_line, parse_greeting};
use snap_orchestrator::qga::{AgentReply, classify_reply, decode_line, is_sync_reply};

/// The message re-encoded as one JSON line.
fn encode(message: &Message) -> Option<Vec<u8>> {
    let value = match message {
        Message::Return { id, value } => json!({"return": value, "id": id}),
        Message::Error { id, class, desc } => {
            json!({"error": {"class": class, "desc": desc}, "id": id})
        }
        Message::Event(event) => {
            let mut obj: Map<String, Value> = event.extra.clone();
            obj.insert("event".into(), Value::String(event.name.clone()));
            obj.insert("data".into(), event.data.clone());
            if let Some(ts) = event.timestamp {
                obj.insert("timestamp".into(), serde_json::to_value(ts).ok()?);
            }
            Value::Object(obj)
        }
        _ => return None,
    };
    serde_json::to_vec(&value).ok()
}

/// What must survive re-encoding (values themselves are not compared: serde_json's default
/// float parsing is not exact, so a float may come back one unit off).
fn key(message: &Message) -> String {
    match message {
        Message::Return { id, .. } => format!("return {id}"),
        Message::Error { id, class, desc } => format!("error {id} {class:?} {desc:?}"),
        Message::Event(event) => format!(
            "event {:?} {:?} {:?}",
            event.name,
            event.timestamp,
            event.extra.keys().collect::<Vec<_>>()
        ),
        other => format!("{other:?}"),
    }
}

fn qmp_line(line: &[u8]) {
    let message = classify_line(line);
    if let Some(encoded) = encode(&message) {
        let again = classify_line(&encoded);
        assert_eq!(
            key(&again),
            key(&message),
            "re-encoding changed the message: {}",
            String::from_utf8_lossy(&encoded)
        );
    }
    if message == Message::Blank {
        assert!(line.iter().all(u8::is_ascii_whitespace));
    }
    // A line parse_greeting accepts is classified as a greeting (unless it is also a reply or
    // an event, which take precedence).
    if parse_greeting(line).is_ok() {
        assert!(matches!(
            message,
            Message::Greeting
                | Message::Event(_)
                | Message::Return { .. }
                | Message::Error { .. }
                | Message::ReplyWithoutId
        ));
    }
}

fuzz_target!(|data: &[u8]| {
    qmp_line(data);
    let _ = parse_greeting(data);
    for line in data.split(|b| *b == b'\n') {
        qmp_line(line);
    }
    if let Some(Ok(reply)) = decode_line(data) {
        match classify_reply(&reply) {
            AgentReply::Return(value) => {
                if let Some(id) = value.as_u64() {
                    assert!(is_sync_reply(&reply, id));
                }
            }
            AgentReply::Error(_) => assert!(reply.get("return").is_none()),
            AgentReply::Other => assert!(!is_sync_reply(&reply, 0)),
        }
    }
});
