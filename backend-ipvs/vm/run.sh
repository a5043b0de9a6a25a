#!/usr/bin/env bash
# Boots a Debian cloud kernel (which has IPVS as modules) under qemu with a small initramfs,
# runs one command inside as root, and exits with that command's exit status.
#
#   backend-ipvs/vm/run.sh [--file SRC[:DEST]]... [--env NAME=VALUE]... [--mem MB] \
#       [--timeout SECONDS] -- COMMAND [ARG]...
#
# - The kernel package (linux-image-cloud-amd64's current version) is fetched with
#   `apt-get download` and unpacked with `dpkg-deb -x` (never installed) into the cache
#   directory, `$IPVS_VM_DIR` or `target/ipvs-vm/` of the workspace.
# - The initramfs holds busybox, ipvsadm, ip, iptables (legacy and nft), nft, sysctl, the
#   modules IPVS, SCTP and the tests need (dependencies resolved with kmod's modprobe against the unpacked
#   tree), every `--file` (default DEST: /bin/<name>), and the shared libraries of every
#   binary in it (ldd). ELF files passed with --file are stripped on the way in.
# - /init mounts proc/sys/dev/run, loads the modules, runs COMMAND with the `--env`
#   variables, prints `SVCNAT_VM_EXIT=<status>` and powers off. The serial console is echoed
#   to stdout and kept in `<cache>/console.log`.
# - Exit status: COMMAND's; 125 when the VM never reported one (boot failure); 124 when the
#   guard timeout (default 1800 s, only against a hung VM) ended it.
#
# Needs: qemu-system-x86 (qemu-system-x86_64), busybox-static, ipvsadm, iptables, nftables,
# iproute2, procps, kmod, apt-get/dpkg-deb. Uses software emulation (TCG): nested KVM does not work on
# the machines this was written for. Set IPVS_VM_ACCEL=kvm to try KVM.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
workspace="$(cd "$here/../.." && pwd)"
cache="${IPVS_VM_DIR:-$workspace/target/ipvs-vm}"
mem=1024
guard=1800
files=()
envs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --file) files+=("$2"); shift 2 ;;
    --env) envs+=("$2"); shift 2 ;;
    --mem) mem="$2"; shift 2 ;;
    --timeout) guard="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "run.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "run.sh: no command given" >&2; exit 2; }

need() {
  for t in "$@"; do
    command -v "$t" >/dev/null || { echo "run.sh: missing $t (apt-get install qemu-system-x86 busybox-static ipvsadm iptables nftables iproute2 procps kmod)" >&2; exit 3; }
  done
}
need qemu-system-x86_64 busybox ipvsadm ip iptables-legacy iptables-nft nft sysctl modprobe depmod ldd dpkg-deb apt-get gzip
bb="$(command -v busybox)"
file "$bb" 2>/dev/null | grep -q "statically linked" || ldd "$bb" 2>&1 | grep -q "not a dynamic" || {
  echo "run.sh: $bb is not static (install busybox-static)" >&2; exit 3; }

# --- kernel -------------------------------------------------------------------------------
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
kver_pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/.*Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -1)"
if [ -z "$kver_pkg" ]; then
  # No package lists: use whatever was unpacked before.
  kver_pkg="$(ls "$cache/kernel" 2>/dev/null | head -1)"
  [ -n "$kver_pkg" ] || { echo "run.sh: cannot resolve linux-image-cloud-amd64 (run apt-get update)" >&2; exit 3; }
fi
kroot="$cache/kernel/$kver_pkg"
if [ ! -d "$kroot/boot" ]; then
  echo "run.sh: fetching $kver_pkg" >&2
  tmp="$(mktemp -d "$cache/dl.XXXXXX")"
  (cd "$tmp" && apt-get download -q "$kver_pkg" >/dev/null 2>&1) || { rm -rf "$tmp"; echo "run.sh: apt-get download $kver_pkg failed" >&2; exit 3; }
  mkdir -p "$kroot.part"
  dpkg-deb -x "$tmp"/*.deb "$kroot.part"
  rm -rf "$tmp"
  mv "$kroot.part" "$kroot"
fi
vmlinuz="$(ls "$kroot"/boot/vmlinuz-* | head -1)"
kver="${vmlinuz##*/vmlinuz-}"
moddir="$kroot/lib/modules/$kver"
[ -f "$moddir/modules.dep" ] || depmod -b "$kroot" "$kver"

# Modules in load order (dependencies first), without duplicates.
wanted=(
  ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_sh ip_vs_mh
  dummy veth bridge
  nf_conntrack nf_nat nf_conntrack_netlink nf_reject_ipv4 nf_reject_ipv6
  iptable_nat iptable_filter iptable_mangle iptable_raw
  ip6table_nat ip6table_filter ip6table_mangle ip6table_raw
  xt_MASQUERADE xt_mark xt_comment xt_addrtype xt_conntrack xt_multiport xt_statistic xt_nat
  xt_tcpudp xt_set xt_ipvs xt_physdev xt_recent ipt_REJECT ip6t_REJECT
  nf_tables nft_compat nft_chain_nat nft_ct nft_masq nft_nat nft_reject nft_reject_inet
  nft_reject_ipv4 nft_reject_ipv6 nft_numgen nft_fib nft_fib_inet nft_fib_ipv4 nft_fib_ipv6
  nft_redir nft_limit nft_counter
  sctp xt_sctp
)
mods=()
declare -A seen=()
for m in "${wanted[@]}"; do
  deps="$(modprobe -d "$kroot" -S "$kver" --show-depends "$m" 2>/dev/null || true)"
  while read -r kind path _; do
    [ "$kind" = insmod ] || continue
    [ -n "${seen[$path]:-}" ] && continue
    seen[$path]=1
    mods+=("$path")
  done <<<"$deps"
done

# --- initramfs ------------------------------------------------------------------------------
root="$(mktemp -d "$cache/root.XXXXXX")"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,lib,lib64,usr/lib,etc,proc,sys,dev,run,tmp,var/run,modules}
cp "$bb" "$root/bin/busybox"
for applet in $("$bb" --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done

libs=()
add_bin() { # SRC DEST
  local src="$1" dest="$2"
  mkdir -p "$root$(dirname "$dest")"
  rm -f "$root$dest" "$root/bin/$(basename "$dest")"
  cp -L "$src" "$root$dest"
  if head -c 4 "$src" | grep -q ELF; then
    strip --strip-debug "$root$dest" 2>/dev/null || true
    while read -r lib; do libs+=("$lib"); done < <(ldd "$src" 2>/dev/null | grep -o '/[^ ]*' || true)
  fi
}
add_bin "$(command -v ipvsadm)" /sbin/ipvsadm
add_bin "$(command -v ip)" /sbin/ip
add_bin "$(command -v sysctl)" /sbin/sysctl
# nft: the userspace backend's ingress table.
add_bin "$(command -v nft)" /sbin/nft
add_bin /usr/sbin/xtables-legacy-multi /sbin/xtables-legacy-multi
add_bin /usr/sbin/xtables-nft-multi /sbin/xtables-nft-multi
for fam in iptables ip6tables; do
  for suffix in "" -save -restore; do
    ln -sf xtables-legacy-multi "$root/sbin/$fam-legacy$suffix"
    ln -sf xtables-nft-multi "$root/sbin/$fam-nft$suffix"
    rm -f "$root/bin/$fam$suffix"
    ln -sf xtables-legacy-multi "$root/sbin/$fam$suffix"
  done
done
xtdir="$(dirname "$(ldd /usr/sbin/xtables-nft-multi | grep -o '/[^ ]*libxtables[^ ]*' | head -1)")/xtables"
if [ -d "$xtdir" ]; then
  mkdir -p "$root$xtdir"
  cp "$xtdir"/*.so "$root$xtdir/"
  for so in "$xtdir"/*.so; do
    while read -r lib; do libs+=("$lib"); done < <(ldd "$so" 2>/dev/null | grep -o '/[^ ]*' || true)
  done
fi
for f in "${files[@]}"; do
  src="${f%%:*}"
  dest="${f#*:}"
  [ "$dest" = "$f" ] && dest="/bin/$(basename "$src")"
  [ -e "$src" ] || { echo "run.sh: no such file $src" >&2; exit 2; }
  add_bin "$src" "$dest"
done
for lib in $(printf '%s\n' "${libs[@]}" | sort -u); do
  [ -e "$lib" ] || continue
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# Both spellings of the loader and library paths (Debian's usrmerge layout).
[ -e "$root/lib64/ld-linux-x86-64.so.2" ] || cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
mkdir -p "$root/usr/lib/x86_64-linux-gnu" "$root/lib/x86_64-linux-gnu"
cp -rn "$root/usr/lib/x86_64-linux-gnu/." "$root/lib/x86_64-linux-gnu/" 2>/dev/null || true
cp -rn "$root/lib/x86_64-linux-gnu/." "$root/usr/lib/x86_64-linux-gnu/" 2>/dev/null || true

i=0
for m in "${mods[@]}"; do
  printf -v n '%03d' "$i"
  cp "$m" "$root/modules/$n-$(basename "$m")"
  i=$((i + 1))
done
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
printf '127.0.0.1 localhost\n::1 localhost\n' >"$root/etc/hosts"
# Protocol and service names (nft and iptables print and parse `sctp`, `tcp`...).
for f in /etc/protocols /etc/services; do
  [ -e "$f" ] && cp "$f" "$root$f"
done
: >"$root/etc/nsswitch.conf"

{
  printf '#!/bin/sh\n'
  for e in "${envs[@]}"; do printf 'export %q\n' "$e"; done
  printf 'exec'
  printf ' %q' "$@"
  printf '\n'
} >"$root/test.sh"
chmod +x "$root/test.sh"

cat >"$root/init" <<'EOF'
#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts /run/netns /var/run && mount -t devpts devpts /dev/pts
for m in /modules/*.ko; do
  insmod "$m" 2>/dev/null || echo "svcnat-vm: insmod $m failed"
done
ip link set lo up
echo "svcnat-vm: kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) cpus, ip_vs $(test -e /proc/net/ip_vs && echo loaded || echo MISSING)"
cd /tmp
/test.sh
rc=$?
echo "SVCNAT_VM_EXIT=$rc"
sync
poweroff -f
EOF
chmod +x "$root/init"

initrd="$cache/initrd.gz"
(cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 >"$initrd.part")
mv "$initrd.part" "$initrd"
echo "run.sh: initramfs $(du -h "$initrd" | cut -f1), ${#mods[@]} modules, kernel $kver" >&2

# --- boot -----------------------------------------------------------------------------------
accel="${IPVS_VM_ACCEL:-tcg}"
log="$cache/console.log"
start=$(date +%s)
set +e
timeout --foreground -k 10 "$guard" qemu-system-x86_64 -accel "$accel" -cpu max -smp 2 -m "$mem" \
  -nographic -no-reboot -nodefaults -serial stdio -monitor none \
  -kernel "$vmlinuz" -initrd "$initrd" \
  -append "console=ttyS0 quiet panic=-1 rdinit=/init" </dev/null | tr -d '\r' | tee "$log"
qrc=${PIPESTATUS[0]}
set -e
echo "run.sh: VM ran $(( $(date +%s) - start )) s (qemu status $qrc)" >&2
if [ "$qrc" = 124 ]; then
  echo "run.sh: the VM did not finish within $guard s" >&2
  exit 124
fi
rc="$(sed -n 's/^SVCNAT_VM_EXIT=\([0-9]*\)$/\1/p' "$log" | tail -1)"
if [ -z "$rc" ]; then
  echo "run.sh: the VM reported no exit status (see $log)" >&2
  exit 125
fi
exit "$rc"
