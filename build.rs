//! Compresses the files herald serves from memory (the dashboard and the socket.io-client
//! bundle) once, at build time, so that a request costs a lookup, not a compression: each
//! file is embedded as it is, gzipped and brotli'd, with an ETag. `src/assets.rs` includes
//! the table written here.
//!
//! It also tells `herald_build_info` (src/metrics.rs) what is built: the git commit
//! (`HERALD_GIT_COMMIT`) and the compiler's version (`HERALD_RUSTC_VERSION`), each
//! `unknown` when it cannot be found out (no git, not a checkout), never a failed build.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// (URL path, source file, content type, cache-control, whether the ETag is the
/// socket.io-client version rather than a digest of the content). The first is the page.
const FILES: &[(&str, &str, &str, &str, bool)] = &[
    (
        "/",
        "dashboard/index.html",
        "text/html; charset=utf-8",
        "no-cache",
        false,
    ),
    (
        "/dashboard/app.js",
        "dashboard/app.js",
        "text/javascript; charset=utf-8",
        "no-cache",
        false,
    ),
    (
        "/dashboard/style.css",
        "dashboard/style.css",
        "text/css; charset=utf-8",
        "no-cache",
        false,
    ),
    // As Node's socket.io server serves them: revalidated, ETag the client's version.
    (
        "/socket.io/socket.io.js",
        "assets/socket.io/socket.io.js",
        "application/javascript; charset=utf-8",
        "public, max-age=0",
        true,
    ),
    (
        "/socket.io/socket.io.min.js",
        "assets/socket.io/socket.io.min.js",
        "application/javascript; charset=utf-8",
        "public, max-age=0",
        true,
    ),
    (
        "/socket.io/socket.io.esm.min.js",
        "assets/socket.io/socket.io.esm.min.js",
        "application/javascript; charset=utf-8",
        "public, max-age=0",
        true,
    ),
];

fn main() {
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    let version_file = root.join("assets/socket.io/VERSION");
    println!("cargo::rerun-if-changed={}", version_file.display());
    let version = std::fs::read_to_string(&version_file).expect("assets/socket.io/VERSION");
    let mut table = String::from("&[\n");
    for (i, (path, source, content_type, cache, versioned)) in FILES.iter().enumerate() {
        let source = root.join(source);
        println!("cargo::rerun-if-changed={}", source.display());
        let body = std::fs::read(&source).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
        let gzip = write(&out, &format!("{i}.gz"), &gzip(&body));
        let brotli = write(&out, &format!("{i}.br"), &brotli(&body));
        let etag = if *versioned {
            format!("\"{}\"", version.trim())
        } else {
            format!("\"{}\"", digest(&body))
        };
        writeln!(
            table,
            "    Asset {{ path: {path:?}, content_type: {content_type:?}, cache_control: {cache:?}, \
             etag: {etag:?}, page: {page}, identity: include_bytes!({source:?}), \
             gzip: include_bytes!({gzip:?}), brotli: include_bytes!({brotli:?}) }},",
            page = i == 0,
        )
        .unwrap();
    }
    table.push(']');
    std::fs::write(out.join("assets.rs"), table).expect("OUT_DIR is writable");
    build_info(&root);
}

/// The commit and compiler `herald_build_info` names.
fn build_info(root: &Path) {
    let commit = git(root, &["rev-parse", "--short=12", "HEAD"]);
    // A new commit or checkout changes one of these files, and so the commit embedded. Only
    // files that exist are watched: cargo reruns a script whose watched file is missing on
    // every build.
    let branch = git(root, &["symbolic-ref", "-q", "HEAD"]);
    for file in ["HEAD", "packed-refs"].into_iter().chain(branch.as_deref()) {
        if let Some(path) = git(root, &["rev-parse", "--git-path", file]) {
            let path = root.join(path);
            if path.exists() {
                println!("cargo::rerun-if-changed={}", path.display());
            }
        }
    }
    let rustc = std::env::var_os("RUSTC")
        .and_then(|rustc| {
            std::process::Command::new(rustc)
                .arg("--version")
                .output()
                .ok()
        })
        .filter(|output| output.status.success())
        .and_then(|output| {
            // `rustc 1.85.0 (4d91de4e4 2025-02-17)`: the version.
            let text = String::from_utf8(output.stdout).ok()?;
            text.split_whitespace().nth(1).map(str::to_owned)
        });
    let label = |value: Option<String>| {
        value
            .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_graphic()))
            .unwrap_or_else(|| "unknown".to_owned())
    };
    println!("cargo::rustc-env=HERALD_GIT_COMMIT={}", label(commit));
    println!("cargo::rustc-env=HERALD_RUSTC_VERSION={}", label(rustc));
}

/// `git ARGS` in `dir`: its output's first line, or `None` when git is missing or fails.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let output = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    text.lines().next().map(str::to_owned)
}

fn write(out: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = out.join(name);
    std::fs::write(&path, bytes).expect("OUT_DIR is writable");
    path
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(body).expect("writes to memory");
    encoder.finish().expect("writes to memory")
}

fn brotli(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let params = brotli::enc::BrotliEncoderParams {
        quality: 11,
        lgwin: 22,
        ..Default::default()
    };
    brotli::BrotliCompress(&mut &body[..], &mut out, &params).expect("writes to memory");
    out
}

/// A short content digest: the first 8 bytes of the file's SHA-256, hex.
fn digest(body: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(&sha2::Sha256::digest(body)[..8])
}
