//! herald: a Socket.IO server that streams the progress of AI sessions to front ends.
//!
//! See `ARCHITECTURE.md` for the code map and the invariants.

pub mod assets;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod datadir;
pub mod delivery;
pub mod demo;
pub mod edge;
pub mod error;
pub mod event;
pub mod feed;
#[cfg(test)]
mod fuzzing;
pub mod http;
pub mod hub;
pub mod intake;
pub mod log;
pub mod metrics;
pub mod orchestrator;
pub mod providers;
pub mod redis;
pub mod server;
pub mod socket;
pub mod sse;
pub mod store;
pub mod subscriber;
pub mod ws;

pub use config::Config;
pub use server::Server;
