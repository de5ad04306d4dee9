//! Cluster glue: with Redis configured, every node hears which sessions other nodes logged
//! events for, and brings its own sockets up to date from the shared log.
//!
//! The announcement channel only says "session S has events up to N"; the events
//! themselves are read from the log, in order, by the hub. So a lost or late announcement
//! costs latency, never an event: after every (re)subscription the node catches up every
//! session it follows. The subscriber reconnects by itself when Redis restarts or its
//! connection is killed.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::task::JoinHandle;

use crate::hub::Hub;

const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_secs(5);

/// Listens for announcements on `channel` until the task is aborted.
pub fn spawn_listener(client: redis::Client, channel: String, hub: Hub) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut retry = FIRST_RETRY;
        loop {
            match listen(&client, &channel, &hub).await {
                Ok(()) => tracing::warn!(channel, "announcement channel closed; resubscribing"),
                Err(error) => {
                    tracing::warn!(channel, %error, "announcement channel failed; resubscribing")
                }
            }
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(LAST_RETRY);
        }
    })
}

async fn listen(client: &redis::Client, channel: &str, hub: &Hub) -> redis::RedisResult<()> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    tracing::info!(channel, "listening for events logged by other nodes");
    // Whatever was announced while nobody listened is in the log.
    if let Err(error) = hub.catch_up_all().await {
        tracing::warn!(%error, "catching up after (re)subscribing failed");
    }
    let mut messages = pubsub.on_message();
    while let Some(message) = messages.next().await {
        let payload: String = message.get_payload()?;
        let Some((_, session_id)) = payload.split_once(' ') else {
            tracing::warn!(payload, "malformed announcement");
            continue;
        };
        if let Err(error) = hub.catch_up_if_followed(session_id).await {
            tracing::warn!(session_id, %error, "could not deliver events logged by another node");
        }
    }
    Ok(())
}
