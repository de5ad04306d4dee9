//! `/socket.io/socket.io.js` and its minified builds (SPEC §6): the socket.io-client browser
//! bundle, served as Node's socket.io server serves it, so that pages with
//! `<script src="/socket.io/socket.io.js">` work unchanged.
//!
//! The files are embedded at build time from `assets/socket.io/`, copied there from the npm
//! package at the version `tests/js/package-lock.json` pins (`scripts/update-socketio-bundle.sh`).
//! Like Node's server: the ETag is the client's version, `Cache-Control: public, max-age=0`
//! (browsers revalidate, and get a 304 while the version is the same).

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The socket.io-client version embedded.
pub const VERSION: &str = include_str!("../assets/socket.io/VERSION");

const FILES: &[(&str, &str)] = &[
    (
        "/socket.io/socket.io.js",
        include_str!("../assets/socket.io/socket.io.js"),
    ),
    (
        "/socket.io/socket.io.min.js",
        include_str!("../assets/socket.io/socket.io.min.js"),
    ),
    (
        "/socket.io/socket.io.esm.min.js",
        include_str!("../assets/socket.io/socket.io.esm.min.js"),
    ),
];

/// Whether `path` is one of the bundle's files (not an Engine.IO request).
pub fn is_bundle(path: &str) -> bool {
    FILES.iter().any(|(p, _)| *p == path)
}

/// Serves the bundle's files; every other request goes on (to the Socket.IO layer, which
/// would otherwise take everything under `/socket.io/`).
pub async fn serve(request: Request, next: Next) -> Response {
    let Some((_, body)) = FILES.iter().find(|(p, _)| *p == request.uri().path()) else {
        return next.run(request).await;
    };
    if !matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    ) {
        return next.run(request).await;
    }
    let etag = format!("\"{VERSION}\"");
    let fresh = request
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|tag| tag.trim() == etag || tag.trim() == "*")
        });
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/javascript; charset=utf-8"),
            )],
            *body,
        )
            .into_response()
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=0"),
    );
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, value);
    }
    response
}
