//! A raw Socket.IO websocket that reads only when the test says so: for clients that stop
//! reading, flood or misbehave. Engine.IO v4 text frames, nothing interpreted for you.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

pub type RawWs = WebSocketStream<TcpStream>;

/// Opens a Socket.IO websocket with a small receive buffer (so the kernel holds little for
/// a client that stops reading), sends the namespace CONNECT (with the harness's token when
/// auth is under test) and returns once the server's CONNECT reply has arrived.
pub async fn connect(addr: SocketAddr) -> RawWs {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(8 * 1024).unwrap();
    let tcp = socket.connect(addr).await.expect("tcp connects");
    let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) = tokio_tungstenite::client_async(url, tcp)
        .await
        .expect("websocket connects");
    let open = next_text(&mut ws).await.expect("open packet");
    assert!(open.starts_with('0'), "open packet: {open}");
    let connect = match super::harness_token() {
        Some(token) => format!("40{}", json!({ "token": token })),
        None => "40".to_owned(),
    };
    ws.send(Message::text(connect)).await.unwrap();
    loop {
        let text = next_text(&mut ws).await.expect("frames until CONNECT");
        if text.starts_with("40") {
            return ws;
        }
    }
}

/// The next text frame, `None` once the connection ends.
pub async fn next_text(ws: &mut RawWs) -> Option<String> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(text)) => return Some(text.to_string()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}
