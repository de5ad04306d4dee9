//! Clients for herald's other ways out (SPEC §6): an SSE reader over reqwest and a plain
//! WebSocket client over tokio-tungstenite, for the transport and cluster tests.

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::{WAIT, harness_token};

/// One SSE frame (or comment) as a client reads it.
#[derive(Debug, Default)]
pub struct Frame {
    pub id: Option<u64>,
    pub event: String,
    pub data: String,
    pub comment: bool,
    pub retry: Option<u64>,
}

impl Frame {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }
}

/// Reads an SSE response frame by frame.
pub struct SseReader {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

/// How a stream read ended when it did not yield a frame.
#[derive(Debug, PartialEq)]
pub enum StreamEnd {
    /// The response ended cleanly.
    Finished,
    /// The connection broke (herald cut the stream off).
    Broken,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    pub async fn next(&mut self) -> Result<Frame, StreamEnd> {
        tokio::time::timeout(WAIT, self.next_frame())
            .await
            .expect("an SSE frame within the wait")
    }

    pub async fn next_frame(&mut self) -> Result<Frame, StreamEnd> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let raw: String = self.buffer.drain(..end + 2).collect();
                return Ok(parse_frame(&raw));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buffer.push_str(std::str::from_utf8(&chunk).unwrap()),
                Some(Err(_)) => return Err(StreamEnd::Broken),
                None => return Err(StreamEnd::Finished),
            }
        }
    }

    /// The next frame that is not a comment.
    pub async fn next_event(&mut self) -> Frame {
        loop {
            let frame = self.next().await.expect("the stream goes on");
            if !frame.comment {
                return frame;
            }
        }
    }
}

pub fn parse_frame(raw: &str) -> Frame {
    let mut frame = Frame::default();
    let mut data = Vec::new();
    for line in raw.lines() {
        if line.starts_with(':') {
            frame.comment = true;
        } else if let Some(v) = line.strip_prefix("id: ") {
            frame.id = v.parse().ok();
        } else if let Some(v) = line.strip_prefix("event: ") {
            frame.event = v.to_owned();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data.push(v);
        } else if let Some(v) = line.strip_prefix("retry: ") {
            frame.retry = v.parse().ok();
        }
    }
    frame.data = data.join("\n");
    frame
}

/// A plain WebSocket client (tokio-tungstenite), reading JSON text frames.
pub struct Ws {
    pub socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl Ws {
    pub async fn connect(url: &str) -> Ws {
        let mut request = url.into_client_request().unwrap();
        if let Some(token) = harness_token().filter(|_| !url.contains("token=")) {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let (socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("the WebSocket connects");
        let mut ws = Ws { socket };
        let hello = ws.next_json().await;
        assert_eq!(hello["type"], "connected");
        assert!(hello["socketId"].is_string());
        ws
    }

    pub async fn send(&mut self, value: Value) {
        self.socket
            .send(Message::Text(value.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.socket.send(message).await.unwrap();
    }

    pub async fn next_message(&mut self) -> Option<Message> {
        match tokio::time::timeout(WAIT, self.socket.next()).await {
            Ok(Some(Ok(message))) => Some(message),
            Ok(_) => None,
            Err(_) => panic!("no WebSocket message within the wait"),
        }
    }

    /// The next JSON text frame (pings skipped).
    pub async fn next_json(&mut self) -> Value {
        loop {
            match self.next_message().await {
                Some(Message::Text(text)) => return serde_json::from_str(&text).unwrap(),
                Some(Message::Ping(_) | Message::Pong(_)) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }
}
