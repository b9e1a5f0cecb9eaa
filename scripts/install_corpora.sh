#!/usr/bin/env bash
# Installs the Debian packages whose text the zoo trains on, when running as root on Debian and any is missing.
# Elsewhere it does nothing: the zoo then falls back to text that ships with Python and says so.
set -u
packages="bible-kjv bible-kjv-text fortunes fortunes-de"
[ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && command -v dpkg >/dev/null || exit 0
missing=""
for p in $packages; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
[ -n "$missing" ] || exit 0
echo "installing corpora:$missing" >&2
apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null \
    || echo "could not install$missing; the zoo will use its fallback text" >&2
exit 0
