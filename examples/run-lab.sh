#!/usr/bin/env bash
# Installs what the lab replay needs (Debian/Ubuntu, as root: the network tools, Chromium as
# the reader's browser, redis), builds svcnat and replays
# lab K105 ("Load Balancing and Service Discovery with Services") in network namespaces.
# Nothing is added to the root network namespace; everything is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "run as root (network namespaces and iptables need it): sudo $0" >&2
  exit 2
fi
missing=()
for tool in ip:iproute2 sysctl:procps iptables:iptables nft:nftables getent:libc-bin nslookup:dnsutils \
  ping:iputils-ping chromium:chromium redis-server:redis-server redis-cli:redis-tools; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
cargo build --release -p svcnat-examples --bins
exec target/release/svcnat-lab
