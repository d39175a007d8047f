#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time, by hand (too slow for .ci/run):
#
#   fuzz/run.sh [SECONDS] [TARGET...]     (default: 60 seconds each, every target)
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`; 0.13.2 was used). On a stable
# toolchain cargo-fuzz passes `-Zsanitizer=address`, which stable rustc refuses unless
# RUSTC_BOOTSTRAP=1 is set, so this script sets it for the fuzz build only (its own target
# dir, fuzz/target; the crate's own build never sees it). Use the same variable for any
# `cargo fuzz` command by hand: without it the build fails (and the next build with it starts
# over from scratch).
#
# Each target runs from its seed corpus (fuzz/seeds/<target>, from the sample register; see
# fuzz/seeds.rs) plus what earlier runs kept (fuzz/corpus/<target>, not committed), with
#   -rss_limit_mb=2048 -malloc_limit_mb=256  unbounded allocation is a failure (oom-*)
#   -timeout=10                              one input running 10 s is a hang (timeout-*)
# A failing input lands in fuzz/artifacts/<target>/; rerun it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/<file>
# Prints per target: executions, coverage, corpus, peak RSS (ASan's own included), result.
# Exits non-zero if any target failed.
set -uo pipefail

cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(record_decode import_line projection_def api_body)

if ! command -v cargo-fuzz >/dev/null; then
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz --locked" >&2
    exit 2
fi
export RUSTC_BOOTSTRAP=1

# import_line opens a ledger under $TMPDIR: keep those in one place, removed at the end.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
logs=fuzz/target/run-logs
mkdir -p "$logs"

echo "building the fuzz targets (cargo fuzz build, release + ASan + debug assertions)"
if ! cargo fuzz build >"$logs/build.log" 2>&1; then
    tail -30 "$logs/build.log" >&2
    exit 2
fi

failed=0
summary=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    before=$(ls "fuzz/artifacts/$t" | wc -l)
    echo "fuzzing $t for ${secs}s (log: $logs/$t.log)"
    TMPDIR=$scratch cargo fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=256 -timeout=10 \
        -print_final_stats=1 >"$logs/$t.log" 2>&1
    rc=$?
    after=$(ls "fuzz/artifacts/$t" | wc -l)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -1)
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$logs/$t.log" | tail -1)
    corp=$(grep -o 'corp: [0-9]*/[0-9]*[a-zA-Z]*' "$logs/$t.log" | tail -1)
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$logs/$t.log" | tail -1)
    if [ "$rc" -eq 0 ] && [ "$after" -eq "$before" ]; then
        result="ok"
    else
        result="FAILED (exit $rc, $((after - before)) new artifact(s) in fuzz/artifacts/$t)"
        failed=1
        grep -E '^(==[0-9]+== ?ERROR|thread .* panicked|SUMMARY)' "$logs/$t.log" | head -5 >&2
    fi
    summary+=("$(printf '%-15s %6ss  %12s  %-20s %-18s %6s MB  %s' "$t" "$secs" "${execs:-?}" "${cov:-cov: ?}" "${corp:-}" "${rss:-?}" "$result")")
done

echo
printf '%-15s %7s  %12s  %-20s %-18s %9s  %s\n' target time executions coverage corpus "peak RSS" result
printf '%s\n' "${summary[@]}"
exit $failed
