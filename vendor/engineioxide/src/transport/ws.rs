//! The ws transport module is responsible for handling websocket connections
//! The only public function is [`new_req`] which is used to upgrade a http request to a websocket connection
//!
//! Other functions are used internally to handle the websocket connection through tasks and channels
//! and to handle upgrade from polling to ws

use std::sync::Arc;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, request::Parts};
use smallvec::smallvec;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        self, Message,
        handshake::derive_accept_key,
        protocol::{Role, WebSocketConfig},
    },
};
use tokio_util::future::FutureExt as _;

use engineioxide_core::{Packet, ProtocolVersion, Sid, Str, TransportType};
use tokio::time::Instant;

use crate::{
    DisconnectReason, Socket, body::ResponseBody, config::EngineIoConfig, engine::EngineIo,
    errors::Error, handler::EngineIoHandler, socket::{InternalRx, QueuedPackets}, transport::make_open_packet,
};

/// Create a response for websocket upgrade
fn ws_response<B>(ws_key: &HeaderValue) -> Response<ResponseBody<B>> {
    let derived = derive_accept_key(ws_key.as_bytes());
    let sec = derived.parse::<HeaderValue>().unwrap();
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::UPGRADE, HeaderValue::from_static("websocket"))
        .header(
            http::header::CONNECTION,
            HeaderValue::from_static("Upgrade"),
        )
        .header(http::header::SEC_WEBSOCKET_ACCEPT, sec)
        .body(ResponseBody::empty_response())
        .unwrap() // we are only using constants
}

/// Upgrade a websocket request to create a websocket connection.
///
/// If a sid is provided in the query it means that is is upgraded from an existing HTTP polling request.
/// In this case the http polling request is closed and the SID is kept for the websocket
pub fn new_req<R: Send + 'static, B, H: EngineIoHandler>(
    engine: Arc<EngineIo<H>>,
    protocol: ProtocolVersion,
    sid: Option<Sid>,
    req: Request<R>,
) -> Result<Response<ResponseBody<B>>, Error> {
    let (parts, body) = req.into_parts();
    let req = Request::from_parts(parts.clone(), body);

    let ws_key = parts
        .headers
        .get("Sec-WebSocket-Key")
        .ok_or(Error::InvalidWebSocketKey)?
        .clone();

    tokio::spawn(async move {
        let conn = hyper::upgrade::on(req)
            .await
            .map(hyper_util::rt::TokioIo::new);

        let res = match conn {
            Ok(conn) => on_init(engine.clone(), conn, protocol, sid, parts).await,
            Err(_e) => {
                #[cfg(feature = "tracing")]
                tracing::debug!("ws upgrade error: {}", _e);
                return;
            }
        };

        match res {
            Ok(_) => {
                #[cfg(feature = "tracing")]
                tracing::debug!(?sid, "ws closed")
            }
            Err(Error::MultipleWebsocketRequests) => {}
            Err(_e) => {
                #[cfg(feature = "tracing")]
                tracing::debug!(?sid, "ws closed with error: {_e}");
                if let Some(sid) = sid {
                    engine.close_session(sid, DisconnectReason::TransportError);
                }
            }
        }
    });

    Ok(ws_response(&ws_key))
}

/// Handle a websocket connection upgrade
///
/// Sends an open packet if it is not an upgrade from a polling request
///
/// (herald patch) Then serves the session in a task of its own ([`serve`]) and returns:
/// the long-lived task holds only what serving needs, none of the opening steps' state.
#[cfg_attr(
    feature = "tracing",
    tracing::instrument(level = "trace", name = "init_websocket", skip(engine, conn, req_data))
)]
pub async fn on_init<H: EngineIoHandler, S>(
    engine: Arc<EngineIo<H>>,
    conn: S,
    protocol: ProtocolVersion,
    sid: Option<Sid>,
    req_data: Parts,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (socket, ws, heartbeat) =
        open_session::<H, S>(&engine, conn, protocol, sid, req_data).await?;
    tokio::spawn(serve::<H, S>(engine, socket, ws, heartbeat));
    Ok(())
}

/// Opens the session of a websocket connection: a new one (OPEN packet), or the upgrade of a
/// polling session. A new v4 session's heartbeat is returned, to run in the connection's task.
async fn open_session<H: EngineIoHandler, S>(
    engine: &Arc<EngineIo<H>>,
    conn: S,
    protocol: ProtocolVersion,
    sid: Option<Sid>,
    req_data: Parts,
) -> Result<(Arc<Socket<H::Data>>, WebSocketStream<S>, Option<Heartbeat>), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(engine.config.ws_read_buffer_size)
        .max_message_size(Some(engine.config.ws_max_message_size))
        .max_frame_size(Some(engine.config.ws_max_frame_size));

    let ws_init = move || WebSocketStream::from_raw_socket(conn, Role::Server, Some(ws_config));
    if let Some(sid) = sid {
        match engine.get_socket(sid) {
            None => Err(Error::UnknownSessionID(sid)),
            Some(socket) if socket.is_ws() => Err(Error::MultipleWebsocketRequests),
            Some(socket) => {
                let mut ws = ws_init().await;

                let upgrade_fut = upgrade_handshake::<H, S>(&socket, &mut ws);
                match tokio::time::timeout(engine.config.upgrade_timeout, upgrade_fut)
                    .with_cancellation_token(&socket.cancellation_token)
                    .await
                {
                    Some(Ok(res)) => res?,
                    Some(Err(_)) => {
                        #[cfg(feature = "tracing")]
                        tracing::debug!(?sid, "ws upgrade timed out, closing session");
                        engine.close_session(socket.id, DisconnectReason::TransportError);
                        return Err(Error::Upgrade);
                    }
                    None => {
                        #[cfg(feature = "tracing")]
                        tracing::debug!(?sid, "socket is being closed");
                        return Err(Error::Upgrade);
                    }
                }
                // The polling session's heartbeat task goes on beating.
                Ok((socket, ws, None))
            }
        }
    } else {
        let socket = engine.create_session(protocol, TransportType::Websocket, req_data, false);

        #[cfg(feature = "tracing")]
        tracing::debug!("new websocket connection");

        let mut ws = ws_init().await;
        init_handshake(socket.id, &mut ws, &engine.config).await?;
        let heartbeat = match protocol {
            ProtocolVersion::V4 => Some(Heartbeat::new(
                engine.config.ping_interval,
                engine.config.ping_timeout,
            )),
            #[allow(unreachable_patterns)]
            _ => {
                socket
                    .clone()
                    .spawn_heartbeat(engine.config.ping_interval, engine.config.ping_timeout);
                None
            }
        };
        Ok((socket, ws, heartbeat))
    }
}

/// (herald patch) The v4 heartbeat of a websocket session, kept by the connection's task:
/// a PING every `interval`, the first one `interval` after the session opens (as the
/// reference engine.io server does), and a PONG expected within `timeout` of each PING.
/// Upstream runs it in a task of its own, fed by a channel; here it costs one timer.
#[derive(Debug)]
struct Heartbeat {
    interval: Duration,
    timeout: Duration,
    next_ping: Instant,
    /// When the PONG of the PING last sent is due, until it comes.
    pong_due: Option<Instant>,
}

impl Heartbeat {
    fn new(interval: Duration, timeout: Duration) -> Self {
        Self {
            interval,
            timeout,
            next_ping: Instant::now() + interval,
            pong_due: None,
        }
    }

    /// When the heartbeat next has something to do.
    fn deadline(&self) -> Instant {
        self.pong_due.unwrap_or(self.next_ping)
    }

    /// The deadline has come: sends a PING, or fails when a PONG is overdue (or the queue is
    /// full, as upstream's heartbeat treats it).
    fn on_deadline<D: Default + Send + Sync + 'static>(
        &mut self,
        socket: &Socket<D>,
    ) -> Result<(), Error> {
        if self.pong_due.is_some() {
            return Err(Error::HeartbeatTimeout);
        }
        socket
            .internal_tx
            .try_send(Box::new(smallvec![Packet::Ping]))
            .map_err(|_| Error::HeartbeatTimeout)?;
        let now = Instant::now();
        self.pong_due = Some(now + self.timeout);
        self.next_ping = (self.next_ping + self.interval).max(now);
        Ok(())
    }

    /// A PONG came. One that comes early (some clients send one first) changes nothing.
    fn on_pong(&mut self) {
        self.pong_due = None;
    }
}

/// What a frame read from the client asks of the connection.
enum Read {
    More,
    /// The client closed the session or its transport (`Ok`), or broke the protocol.
    Done(Result<(), Error>),
}

/// Handles one frame (or the end of the stream, or a read error) from the client.
fn on_frame<H: EngineIoHandler>(
    engine: &Arc<EngineIo<H>>,
    socket: &Arc<Socket<H::Data>>,
    heartbeat: Option<&mut Heartbeat>,
    frame: Option<Result<Message, tungstenite::Error>>,
) -> Read {
    let msg = match frame {
        Some(Ok(msg)) => msg,
        Some(Err(e)) => return Read::Done(Err(e.into())),
        None => return Read::Done(Ok(())),
    };
    match msg {
        Message::Text(msg) => match Packet::parse(socket.protocol, ws_bytes_to_str(msg)) {
            Ok(Packet::Close) => {
                #[cfg(feature = "tracing")]
                tracing::debug!("[sid={}] closing session", socket.id);
                Read::Done(Ok(()))
            }
            Ok(Packet::Pong | Packet::Ping) => {
                match heartbeat {
                    Some(heartbeat) => heartbeat.on_pong(),
                    // An upgraded session's heartbeat runs in its own task.
                    None => socket.heartbeat.notify_one(),
                }
                Read::More
            }
            Ok(Packet::Message(msg)) => {
                engine.handler.on_message(msg, socket.clone());
                Read::More
            }
            Ok(p) => Read::Done(Err(Error::BadPacket(p))),
            Err(e) => Read::Done(Err(e.into())),
        },
        Message::Binary(mut data) => {
            if socket.protocol == ProtocolVersion::V3 && !data.is_empty() {
                // The first byte is the message type, which we don't need.
                data = data.split_off(1);
            }
            engine.handler.on_binary(data, socket.clone());
            Read::More
        }
        Message::Close(_) => {
            #[cfg(feature = "tracing")]
            tracing::debug!("websocket closed, closing session");
            Read::Done(Ok(()))
        }
        _ => {
            #[cfg(feature = "tracing")]
            tracing::debug!(sid = ?socket.id, "unexpected ws message");
            Read::More
        }
    }
}

/// The websocket message of one packet (`None` for a NOOP).
fn to_message(protocol: ProtocolVersion, item: Packet) -> Option<Message> {
    match item {
        Packet::Binary(bin) | Packet::BinaryV3(bin) => {
            if protocol == ProtocolVersion::V3 {
                // v3 protocol requires packet type as the first byte.
                // This requires a new buffer. This is OK as it is only for the V3 protocol.
                let mut buff = Vec::with_capacity(bin.len() + 1);
                buff.push(0x04);
                buff.extend(bin);
                Some(Message::Binary(buff.into()))
            } else {
                Some(Message::Binary(bin))
            }
        }
        // A Noop Packet maybe sent by the server to upgrade from a polling connection
        // In the case that the packet was not poll in time it will remain in the buffer and therefore
        // it should be discarded here
        Packet::Noop => None,
        item => {
            let packet: String = item.try_into().unwrap();
            Some(Message::Text(packet.into()))
        }
    }
}

/// Writes packets to the websocket (without flushing them). The packets are taken from
/// their box one at a time, so the future holds one message, not the whole buffer.
async fn feed_packets<S>(
    ws: &mut WebSocketStream<S>,
    protocol: ProtocolVersion,
    mut packets: QueuedPackets,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    for item in packets.drain(..) {
        let Some(message) = to_message(protocol, item) else {
            continue;
        };
        if let Err(_e) = ws.feed(message).await {
            #[cfg(feature = "tracing")]
            tracing::debug!("error sending packet: {}", _e);
        }
    }
}

/// (herald patch) Serves a websocket session in the connection's one task: reads the
/// client's frames and hands them to the handler, writes the socket's queued packets, and
/// keeps a new session's heartbeat. Upstream spawns a reader, a writer and a heartbeat task
/// per connection (with a channel for the heartbeat and a lock between the halves of the
/// stream); one task holds the same state in a fraction of the memory.
///
/// Frames are read before queued packets are written in each turn, so a steady flow of
/// outgoing packets never keeps a client's PONG unread. The session ends when it is closed
/// (cancellation token) or the client ends it; what was queued before is then written, and
/// the stream flushed and closed, within `CLOSE_GRACE` of the close: a client that stopped
/// reading cannot keep its connection by blocking the writes.
async fn serve<H: EngineIoHandler, S>(
    engine: Arc<EngineIo<H>>,
    socket: Arc<Socket<H::Data>>,
    mut ws: WebSocketStream<S>,
    mut heartbeat: Option<Heartbeat>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (engine, socket) = (&engine, &socket);
    let session = async {
        // A polling request that was in progress during the upgrade may still hold the lock.
        let lock = socket.internal_rx.lock();
        let Some(mut internal_rx) = lock
            .with_cancellation_token(&socket.cancellation_token)
            .await
        else {
            #[cfg(feature = "tracing")]
            tracing::debug!(sid = %socket.id, "session closed before starting the ws writer");
            return;
        };
        let InternalRx {
            buffered_rx,
            volatile_rx,
            ..
        } = &mut *internal_rx;

        // One timer for the heartbeat, reset only when its deadline moves.
        let timer = tokio::time::sleep_until(heartbeat.as_ref().map_or_else(
            || Instant::now() + Duration::from_secs(86_400),
            Heartbeat::deadline,
        ));
        tokio::pin!(timer);
        loop {
            tokio::select! {
                biased;
                _ = socket.cancellation_token.cancelled() => break,
                _ = &mut timer, if heartbeat.is_some() => {
                    let Some(beat) = heartbeat.as_mut() else { continue };
                    if let Err(_e) = beat.on_deadline(socket) {
                        #[cfg(feature = "tracing")]
                        tracing::debug!(id = ?socket.id, "heartbeat error: {_e}");
                        socket.close(DisconnectReason::HeartbeatTimeout);
                        continue;
                    }
                    timer.as_mut().reset(beat.deadline());
                }
                frame = ws.next() => {
                    let pong_was_due = heartbeat.as_ref().and_then(|h| h.pong_due);
                    match on_frame(engine, socket, heartbeat.as_mut(), frame) {
                        Read::More => {}
                        Read::Done(result) => {
                            let reason = match &result {
                                Ok(()) => DisconnectReason::TransportClose,
                                Err(e) => {
                                    #[cfg(feature = "tracing")]
                                    tracing::debug!("error when handling packet: {:?}", e);
                                    Option::<DisconnectReason>::from(e)
                                        .unwrap_or(DisconnectReason::TransportError)
                                }
                            };
                            #[cfg(feature = "tracing")]
                            tracing::debug!(sid = %socket.id, "ws transport was closed");
                            engine.close_session(socket.id, reason);
                            break;
                        }
                    }
                    if let Some(beat) = heartbeat.as_ref().filter(|h| h.pong_due != pong_was_due) {
                        timer.as_mut().reset(beat.deadline());
                    }
                }
                items = buffered_rx.recv() => {
                    let Some(packets) = items else { break };
                    feed_packets(&mut ws, socket.protocol, packets).await;
                    while let Ok(packets) = buffered_rx.try_recv() {
                        feed_packets(&mut ws, socket.protocol, packets).await;
                    }
                    #[cfg(feature = "tracing")]
                    tracing::trace!(sid = %socket.id, "ws flush");
                    ws.flush().await.ok();
                }
                Ok(()) = volatile_rx.changed() => {
                    let val = volatile_rx.borrow_and_update().clone();
                    if let Some(packets) = val {
                        #[cfg(feature = "tracing")]
                        tracing::debug!(sid = ?socket.id, "ws volatile flush: {} packets", packets.len());
                        feed_packets(&mut ws, socket.protocol, packets).await;
                        ws.flush().await.ok();
                    }
                },
            }
        }

        // What was queued before the close (a CLOSE packet, say) still goes out.
        while let Ok(packets) = buffered_rx.try_recv() {
            feed_packets(&mut ws, socket.protocol, packets).await;
        }
        #[cfg(feature = "tracing")]
        tracing::trace!(sid = %socket.id, "ws closing flush");
        ws.flush().await.ok();
        ws.close(None).await.ok();
    };
    let closed_long_enough = async {
        socket.cancellation_token.cancelled().await;
        tokio::time::sleep(CLOSE_GRACE).await;
    };
    tokio::select! {
        _ = session => {}
        _ = closed_long_enough => {
            #[cfg(feature = "tracing")]
            tracing::debug!(sid = %socket.id, "ws writer still blocked after close: dropping the connection");
        }
    }
}

/// (herald patch) How long a closed session's websocket writer may still take to flush.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
/// Send a Engine.IO [`OpenPacket`] to initiate a websocket connection
async fn init_handshake<S>(
    sid: Sid,
    ws: &mut WebSocketStream<S>,
    config: &EngineIoConfig,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let packet = Packet::Open(make_open_packet(TransportType::Websocket, sid, config));
    let packet: String = packet.into();
    ws.send(Message::Text(packet.into())).await?;
    Ok(())
}

/// Upgrade a session from a polling request to a websocket request.
///
/// Before upgrading the session the server should send a NOOP packet to any pending polling request.
///
/// ## Handshake :
/// ```text
/// CLIENT                                                 SERVER
///│                                                      │
///│   GET /engine.io/?EIO=4&transport=websocket&sid=...  │
///│ ───────────────────────────────────────────────────► │
///│  ◄─────────────────────────────────────────────────┘ │
///│            HTTP 101 (WebSocket handshake)            │
///│                                                      │
///│            -----  WebSocket frames -----             │
///│  ─────────────────────────────────────────────────►  │
///│                         2probe                       │ (ping packet)
///│  ◄─────────────────────────────────────────────────  │
///│                         3probe                       │ (pong packet)
///│  ─────────────────────────────────────────────────►  │
///│                         5                            │ (upgrade packet)
///│                                                      │
///│            -----  WebSocket frames -----             │
/// ```
#[cfg_attr(
    feature = "tracing",
    tracing::instrument(level = "trace", skip(socket, ws))
)]
async fn upgrade_handshake<H: EngineIoHandler, S>(
    socket: &Arc<Socket<H::Data>>,
    ws: &mut WebSocketStream<S>,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    #[cfg(feature = "tracing")]
    tracing::debug!("starting websocket connection upgrade");

    // The socket is upgrading, from now on all polling
    // request will return a `Packet::Noop`
    socket.start_upgrade();

    // We send a last Noop request to close a potential waiting polling request.
    socket
        .internal_tx
        .send(Box::new(smallvec![Packet::Noop]))
        .await
        .map_err(|_| Error::Upgrade)?;

    // wait for any current polling connection to finish by waiting for the socket to be unlocked
    // All other polling connection will be immediately closed with a NOOP packet.
    let _lock = socket.internal_rx.lock().await;

    // Fetch the next packet from the ws stream, it should be a PingUpgrade packet
    let msg = match ws.next().await {
        Some(Ok(Message::Text(d))) => d,
        _ => Err(Error::Upgrade)?,
    };
    match Packet::parse(socket.protocol, ws_bytes_to_str(msg))? {
        Packet::PingUpgrade => {
            #[cfg(feature = "tracing")]
            tracing::debug!("received first ping upgrade");
            // Respond with a PongUpgrade packet
            ws.send(Message::Text(String::from(Packet::PongUpgrade).into()))
                .await?;
        }
        p => Err(Error::BadPacket(p))?,
    };

    // Fetch the next packet from the ws stream, it should be an Upgrade packet
    let msg = match ws.next().await {
        Some(Ok(Message::Text(d))) => d,
        Some(Ok(Message::Close(_))) => {
            #[cfg(feature = "tracing")]
            tracing::debug!("ws stream closed before upgrade");
            Err(Error::Upgrade)?
        }
        _ => {
            #[cfg(feature = "tracing")]
            tracing::debug!("unexpected ws message before upgrade");
            Err(Error::Upgrade)?
        }
    };
    match Packet::parse(socket.protocol, ws_bytes_to_str(msg))? {
        Packet::Upgrade => {
            #[cfg(feature = "tracing")]
            tracing::debug!("ws upgraded successfully")
        }
        p => Err(Error::BadPacket(p))?,
    };

    socket.upgrade_to_websocket();
    Ok(())
}

fn ws_bytes_to_str(bytes: tungstenite::Utf8Bytes) -> Str {
    // SAFETY: the bytes are guaranteed to be valid UTF-8 by the tungstenite parser
    unsafe { Str::from_bytes_unchecked(bytes.into()) }
}
