#!/usr/bin/env bash
# The README's second command: installs what the test suite needs when it is missing
# (Debian/Ubuntu, as root), then runs every test: `cargo test --workspace`.
#
# What the tests use: iproute2 and procps (network namespaces, sysctls), iptables (both
# flavours), nftables (the userspace datapath's ingress table), curl (/metrics), dnsutils
# (dig, nslookup), iputils-ping (the lab's `ping redis`), chromium and redis (the lab's
# browser and its redis pods), and for the IPVS tests, which boot Debian's cloud kernel in a VM
# (this kind of machine's kernel has no IPVS): qemu-system-x86, busybox-static, ipvsadm,
# kmod. Not root: nothing is installed, and the namespace tests print `SKIP: why`.
# `.ci/run` calls this script too. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
need=(ip:iproute2 sysctl:procps iptables-legacy-restore:iptables iptables-nft-restore:iptables
  nft:nftables curl:curl dig:dnsutils ping:iputils-ping chromium:chromium redis-server:redis-server
  redis-cli:redis-tools qemu-system-x86_64:qemu-system-x86 busybox:busybox-static
  ipvsadm:ipvsadm depmod:kmod)
missing=()
for pair in "${need[@]}"; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "run-tests: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2046 # one word per package
    apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
  else
    echo "run-tests: missing ${missing[*]} (not root, or no apt-get): the tests that need them print SKIP" >&2
  fi
fi
exec cargo test --workspace "$@"
