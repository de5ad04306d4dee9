#!/usr/bin/env bash
# Checks that herald builds the patched socketioxide and engineioxide in vendor/, and that
# each one's sources are exactly the published crate plus its herald.patch, so
# HERALD-PATCH.md describes all there is. The test command runs it.
#
#   bash scripts/check-vendor.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

fail() { printf 'check-vendor: %s\n' "$*" >&2; exit 1; }

# 1. cargo resolves both crates to vendor/, not to crates.io.
metadata="$(cargo metadata --format-version 1 --locked)"
for crate in socketioxide engineioxide; do
  manifest="$(printf '%s' "$metadata" | node -e '
    const m = JSON.parse(require("fs").readFileSync(0, "utf8"));
    const ps = m.packages.filter(p => p.name === process.argv[1]);
    if (ps.length !== 1) { console.error(`${ps.length} packages named ${process.argv[1]}`); process.exit(1); }
    if (ps[0].source !== null) { console.error(`${process.argv[1]} comes from ${ps[0].source}`); process.exit(1); }
    console.log(ps[0].manifest_path + " " + ps[0].version);
  ' "$crate")" || fail "$crate is not the vendored crate"
  case "$manifest" in
    "$ROOT/vendor/$crate/Cargo.toml "*) ;;
    *) fail "$crate resolves to $manifest, not vendor/$crate" ;;
  esac
  version="${manifest##* }"

  # 2. vendor/<crate>/src is the published <crate>-<version>/src with herald.patch applied.
  pristine="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"$crate-$version" 2>/dev/null | head -1 || true)"
  if [ -z "$pristine" ]; then
    # Not downloaded yet (herald's build never needs it): fetch it through a throwaway crate.
    tmp="$(mktemp -d)"
    mkdir -p "$tmp/src" && : >"$tmp/src/lib.rs"
    printf '[package]\nname = "fetch-pristine"\nversion = "0.0.0"\nedition = "2021"\n[workspace]\n[dependencies]\n%s = "=%s"\n' \
      "$crate" "$version" >"$tmp/Cargo.toml"
    (cd "$tmp" && cargo fetch -q) || fail "cannot fetch $crate $version from crates.io"
    rm -rf "$tmp"
    pristine="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"$crate-$version" | head -1)"
  fi
  work="$(mktemp -d)"
  cp -r "$pristine/src" "$work/src"
  (cd "$work" && patch -s -p1 --no-backup-if-mismatch <"$ROOT/vendor/$crate/herald.patch") \
    || fail "vendor/$crate/herald.patch does not apply to the published $crate $version"
  if ! diff -r "$work/src" "vendor/$crate/src" >"$work/diff"; then
    cat "$work/diff" >&2
    fail "vendor/$crate/src differs from $crate $version + herald.patch (above): update herald.patch and HERALD-PATCH.md"
  fi
  rm -rf "$work"
  printf 'check-vendor: %s %s = the published crate + herald.patch, built from vendor/\n' "$crate" "$version"
done
