#!/usr/bin/env bash
# Builds the Debian package `mcast` from the release binaries:
#   bash packaging/build-deb.sh            # -> target/debian/mcast_<version>-1_<arch>.deb
#   sudo dpkg -i target/debian/mcast_*.deb
# Builds the release binaries first (incremental; MCAST_DEB_NO_BUILD=1 uses them as they are,
# as the package test does after CI's `cargo build --release --workspace --bins`), makes the
# manual pages (`<bin> man DIR`) and shell completions (`<bin> completions SHELL`) into
# target/assets/, then runs `cargo deb --no-build` (metadata: [package.metadata.deb] in
# Cargo.toml). Needs cargo-deb: `cargo install cargo-deb --locked`. Prints the .deb's path
# on its last line. MCAST_DEB_OUTPUT=DIR/ puts it there; MCAST_DEB_FAST=1 compresses it
# lightly (tests/package.rs: 7 s instead of 20 s).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
  echo "build-deb.sh: cargo-deb is not installed: run \`cargo install cargo-deb --locked\`" >&2
  exit 2
fi
if [ "${MCAST_DEB_NO_BUILD:-0}" != 1 ]; then
  cargo build --release --workspace --bins
fi

target="${CARGO_TARGET_DIR:-target}"
bins=(mcastd mcast-director mcast-recv)
for b in "${bins[@]}"; do
  if [ ! -x "$target/release/$b" ]; then
    echo "build-deb.sh: $target/release/$b is missing: run \`cargo build --release --workspace --bins\`" >&2
    exit 2
  fi
done

# cargo-deb reads these paths relative to the workspace root (Cargo.toml's assets).
assets=target/assets
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions/bash" "$assets/completions/zsh" "$assets/completions/fish"
for b in "${bins[@]}"; do
  "$target/release/$b" man "$assets/man" >/dev/null
  "$target/release/$b" completions bash >"$assets/completions/bash/$b"
  "$target/release/$b" completions zsh >"$assets/completions/zsh/_$b"
  "$target/release/$b" completions fish >"$assets/completions/fish/$b.fish"
done

# --no-strip: the binaries are already built with their debug info split out (profile.release
# strip = "debuginfo"); they keep their symbols for backtraces, as README says. cargo-deb
# warns that split-debuginfo is "not supported": it means it will not package the .dwp files,
# which is intended.
args=(-p mcast --no-build --no-strip)
if [ -n "${MCAST_DEB_OUTPUT:-}" ]; then args+=(--output "$MCAST_DEB_OUTPUT"); fi
if [ "${MCAST_DEB_FAST:-0}" = 1 ]; then args+=(--fast); fi
out="$(cargo deb "${args[@]}" | tail -n 1)"
if [ ! -f "$out" ]; then
  echo "build-deb.sh: cargo deb did not report a package file (last line: $out)" >&2
  exit 1
fi
echo "$out"
