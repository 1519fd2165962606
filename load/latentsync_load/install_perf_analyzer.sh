#!/usr/bin/env bash
# Install Triton's perf_analyzer 2.60 into a cache folder and write a launcher; idempotent (a second run only
# prints the launcher's path).
#
#   load/install_perf_analyzer.sh            # prints the launcher: $CACHE/bin/perf_analyzer
#   $(load/install_perf_analyzer.sh) --help
#
# The perf-analyzer wheels are tagged manylinux_2_38; on glibc >= 2.38 (Debian 13, Ubuntu 24.04) the binary
# runs as it is. On older systems (Debian 12: glibc 2.36, where `pip install perf-analyzer` silently gives an
# empty 0.1.0 placeholder) the launcher runs it with Debian 13's C/C++ runtime beside it, through that
# runtime's own dynamic loader (../shared/LOCAL-TRITON.md). Nothing outside $CACHE is changed.
#
# Environment: LATENTSYNC_PA_CACHE (default ~/.cache/latentsync/perf_analyzer), PA_VERSION (default 2.60.0),
#              PIP (default: this checkout's .venv/bin/pip, else pip3).
set -euo pipefail

VERSION=${PA_VERSION:-2.60.0}
CACHE=${LATENTSYNC_PA_CACHE:-$HOME/.cache/latentsync/perf_analyzer}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PIP=${PIP:-$([ -x "$HERE/.venv/bin/pip" ] && echo "$HERE/.venv/bin/pip" || echo pip3)}
LAUNCHER=$CACHE/bin/perf_analyzer
RUNTIME_DEBS=(libc6 libstdc++6 libgcc-s1 libssl3t64 zlib1g)   # what the binary links against, from trixie

log() { echo "install_perf_analyzer: $*" >&2; }

if [ -x "$LAUNCHER" ] && "$LAUNCHER" --version >/dev/null 2>&1; then
    echo "$LAUNCHER"
    exit 0
fi
mkdir -p "$CACHE/bin"

# 1. The wheel (binary only: its Python wrapper is not used).
BIN=$CACHE/wheel-$VERSION/perf_analyzer/bin/perf_analyzer
if [ ! -x "$BIN" ]; then
    log "downloading perf-analyzer $VERSION"
    rm -rf "$CACHE/wheel-$VERSION" && mkdir -p "$CACHE/wheel-$VERSION"
    "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_38_x86_64 -d "$CACHE/wheel-$VERSION" "perf-analyzer==$VERSION"
    python3 -m zipfile -e "$CACHE/wheel-$VERSION"/perf_analyzer-*.whl "$CACHE/wheel-$VERSION"
    chmod +x "$BIN"
fi

# 2. A runtime new enough for it, unless the system's already is.
glibc_ok() { python3 -c 'import os, sys; v = os.confstr("CS_GNU_LIBC_VERSION").split()[1]; \
sys.exit(0 if tuple(map(int, v.split(".")[:2])) >= (2, 38) else 1)'; }
if glibc_ok; then
    printf '#!/bin/sh\nexec "%s" "$@"\n' "$BIN" > "$LAUNCHER"
else
    ROOT=$CACHE/trixie
    LIB=$ROOT/usr/lib/x86_64-linux-gnu
    if [ ! -e "$LIB/ld-linux-x86-64.so.2" ] || [ ! -e "$LIB/libstdc++.so.6" ] || [ ! -e "$LIB/libssl.so.3" ]; then
        log "glibc < 2.38: fetching Debian 13 runtime libraries (${RUNTIME_DEBS[*]})"
        APT=$CACHE/apt
        mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/debs"
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
            > "$APT/sources.list"
        OPTS=(-o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
              -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" -o "APT::Architecture=amd64"
              -o "Debug::NoLocking=1" -q)
        apt-get "${OPTS[@]}" update >&2
        (cd "$APT/debs" && rm -f ./*.deb && apt-get "${OPTS[@]}" download "${RUNTIME_DEBS[@]}" >&2)
        rm -rf "$ROOT" && mkdir -p "$ROOT"
        for deb in "$APT/debs"/*.deb; do dpkg -x "$deb" "$ROOT"; done
    fi
    printf '#!/bin/sh\n# perf_analyzer %s with the Debian 13 runtime in %s\nL=%s\nexec "$L/ld-linux-x86-64.so.2" --library-path "$L" "%s" "$@"\n' \
        "$VERSION" "$ROOT" "$LIB" "$BIN" > "$LAUNCHER"
fi
chmod +x "$LAUNCHER"
"$LAUNCHER" --version >/dev/null 2>&1 || { log "the launcher does not run: $LAUNCHER"; exit 1; }
log "installed: $LAUNCHER"
echo "$LAUNCHER"
