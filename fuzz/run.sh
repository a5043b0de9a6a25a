#!/usr/bin/env bash
# Builds every fuzz target with libFuzzer's coverage instrumentation on stable Rust and runs
# each for a bounded time; exits non-zero when a target crashes (the crashing input is left
# in fuzz/artifacts/<target>/ and printed).
#
#   fuzz/run.sh [seconds per target, default 30] [target...]
#
# Stable Rust needs neither cargo-fuzz nor nightly: the flags below are the ones
# `cargo fuzz build --sanitizer none` passes (all -C flags, stable), so this script is
# cargo-fuzz without the install. No sanitizer: Rust code here is safe, and panics,
# overflows (overflow-checks on) and debug assertions are what the targets check.
# The corpus grows in fuzz/target/corpus/<target> (not committed), seeded from the
# committed fuzz/corpus/<target>.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-30}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(manifest resolver dns_wire iptables_save plan_stateful userspace_frame ipvs_netlink nft_netlink)
fi
triple=$(rustc -vV | sed -n 's/^host: //p')

export RUSTFLAGS="--cfg fuzzing \
 -Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 -Cllvm-args=-sanitizer-coverage-stack-depth \
 -Cllvm-args=-simplifycfg-branch-fold-threshold=0"
# --target keeps the flags off build scripts and proc macros, as cargo-fuzz does.
cargo build --release --target "$triple" --bins

bin=target/$triple/release
failed=()
for t in "${targets[@]}"; do
  work=target/corpus/$t
  mkdir -p "$work" "artifacts/$t" "corpus/$t"
  log=target/fuzz-$t.log
  echo "--- $t: ${secs}s"
  # -rss_limit_mb: a leak or blowup is a crash too; -timeout: one input over 10 s is a hang.
  if "$bin/$t" "$work" "corpus/$t" -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 \
      -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"$log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
    echo "$t: $runs executions, $cov, corpus $(ls "$work" | wc -l) inputs"
  else
    failed+=("$t")
    tail -40 "$log"
    echo "$t: CRASH; reproduce with: $bin/$t artifacts/$t/<file>"
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "crashed: ${failed[*]}"
  exit 1
fi
