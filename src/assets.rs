//! The files herald serves from memory: the dashboard at `/` (SPEC §8) and the
//! socket.io-client browser bundle at `/socket.io/socket.io.js` and its minified builds
//! (SPEC §6), so that pages with `<script src="/socket.io/socket.io.js">` work unchanged.
//!
//! Everything is embedded at build time: `build.rs` reads `dashboard/` and
//! `assets/socket.io/` (copied from the npm package at the version
//! `tests/js/package-lock.json` pins, `scripts/update-socketio-bundle.sh`) and stores each
//! file as it is, gzipped and brotli'd, so a request picks the encoding it accepts and
//! nothing is compressed at run time. Caching: every file is revalidated (`no-cache`, or
//! Node's `public, max-age=0` for the bundle) against its ETag and answered 304 while it is
//! unchanged; the bundle's ETag is the client's version, as Node's server sends, the
//! dashboard's a digest of the file.

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The socket.io-client version embedded.
pub const SOCKET_IO_VERSION: &str = include_str!("../assets/socket.io/VERSION");

/// One embedded file in its three encodings.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    cache_control: &'static str,
    etag: &'static str,
    /// The dashboard's HTML page, which gets the page's security headers.
    page: bool,
    identity: &'static [u8],
    gzip: &'static [u8],
    brotli: &'static [u8],
}

static FILES: &[Asset] = include!(concat!(env!("OUT_DIR"), "/assets.rs"));

/// Whether `path` is one of the embedded files (and so not an Engine.IO request).
pub fn is_asset(path: &str) -> bool {
    find(path).is_some()
}

fn find(path: &str) -> Option<&'static Asset> {
    FILES.iter().find(|asset| asset.path == path)
}

/// Serves the embedded files to `GET` and `HEAD`; every other request goes on (to the
/// Socket.IO layer, which would otherwise take everything under `/socket.io/`).
pub async fn serve(request: Request, next: Next) -> Response {
    let Some(asset) = find(request.uri().path()) else {
        return next.run(request).await;
    };
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return next.run(request).await;
    }
    respond(asset, request.headers())
}

fn respond(asset: &Asset, headers: &HeaderMap) -> Response {
    let mut response = if is_fresh(asset, headers) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let (encoding, body) = match Encoding::preferred(headers) {
            Encoding::Brotli => (Some("br"), asset.brotli),
            Encoding::Gzip => (Some("gzip"), asset.gzip),
            Encoding::Identity => (None, asset.identity),
        };
        let mut response = (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            body,
        )
            .into_response();
        if let Some(encoding) = encoding {
            response
                .headers_mut()
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static(encoding));
        }
        response
    };
    let out = response.headers_mut();
    out.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(asset.cache_control),
    );
    out.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    out.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    if asset.page {
        // The page runs scripts from this server only and is never framed.
        out.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'self'; connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            ),
        );
        out.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
    }
    response
}

fn is_fresh(asset: &Asset, headers: &HeaderMap) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',').any(|tag| {
                let tag = tag.trim();
                tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == asset.etag
            })
        })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Brotli,
    Gzip,
    Identity,
}

impl Encoding {
    /// The best encoding `Accept-Encoding` allows: brotli, then gzip (each unless its
    /// `q` is 0, or `*` covers it), else none.
    fn preferred(headers: &HeaderMap) -> Self {
        let mut brotli = None;
        let mut gzip = None;
        let mut any = None;
        for value in headers.get_all(header::ACCEPT_ENCODING) {
            let Ok(value) = value.to_str() else { continue };
            for item in value.split(',') {
                let mut parts = item.split(';');
                let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
                let accepted = parts
                    .filter_map(|p| p.trim().strip_prefix("q="))
                    .all(|q| q.trim().parse::<f32>().is_ok_and(|q| q > 0.0));
                match name.as_str() {
                    "br" => brotli = Some(accepted),
                    "gzip" | "x-gzip" => gzip = Some(accepted),
                    "*" => any = Some(accepted),
                    _ => {}
                }
            }
        }
        let any = any.unwrap_or(false);
        if brotli.unwrap_or(any) {
            Self::Brotli
        } else if gzip.unwrap_or(any) {
            Self::Gzip
        } else {
            Self::Identity
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepting(value: &str) -> Encoding {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_str(value).unwrap(),
        );
        Encoding::preferred(&headers)
    }

    #[test]
    fn the_best_accepted_encoding_is_chosen() {
        assert_eq!(accepting("gzip, deflate, br, zstd"), Encoding::Brotli);
        assert_eq!(accepting("gzip"), Encoding::Gzip);
        assert_eq!(accepting("br;q=0, gzip;q=0.5"), Encoding::Gzip);
        assert_eq!(accepting("br;q=0, gzip;q=0"), Encoding::Identity);
        assert_eq!(accepting("*"), Encoding::Brotli);
        assert_eq!(accepting("*;q=0"), Encoding::Identity);
        assert_eq!(accepting("identity"), Encoding::Identity);
        assert_eq!(Encoding::preferred(&HeaderMap::new()), Encoding::Identity);
    }

    #[test]
    fn every_embedded_encoding_decodes_to_the_file() {
        use std::io::Read;
        for asset in FILES {
            let mut gunzipped = Vec::new();
            flate2::read::GzDecoder::new(asset.gzip)
                .read_to_end(&mut gunzipped)
                .unwrap();
            assert_eq!(gunzipped, asset.identity, "{}", asset.path);
            let mut unbrotlied = Vec::new();
            brotli::BrotliDecompress(&mut &asset.brotli[..], &mut unbrotlied).unwrap();
            assert_eq!(unbrotlied, asset.identity, "{}", asset.path);
            assert!(asset.brotli.len() < asset.identity.len(), "{}", asset.path);
        }
    }
}
