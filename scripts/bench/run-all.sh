#!/usr/bin/env bash
# Run every benchmark, then render docs/benchmarks.md and docs/plots/.
#
#   sudo scripts/bench/run-all.sh        (env: REPS_COLD=5 REPS_WARM=3 REPS_SEQ=3 REPS_ATTACH=3 REPS_RECORD=5)
#
# Builds the release binary first unless SKIP_BUILD=1. Raw results go to
# target/bench/ (one .jsonl and one .meta.json per part); a failing part is
# logged and the others still run. Each part cleans up its own servers,
# mounts and namespaces on exit.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  (cd "$repo" && cargo build --release) || { echo "run-all.sh: cargo build --release failed" >&2; exit 1; }
fi

failed=()
run_part() { # NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name" >&2
  if ! timeout --kill-after=30 "$limit" "$@"; then
    echo "run-all.sh: $name failed or timed out after $limit s" >&2
    failed+=("$name")
  fi
}

run_part coldstart 1800 "$here/coldstart.sh" "${REPS_COLD:-5}"
run_part warm 1800 "$here/warm.sh" "${REPS_WARM:-3}"
run_part coldseq 1800 "$here/coldseq.sh" "${REPS_SEQ:-3}"
run_part attach 3600 "$here/attach.sh" "${REPS_ATTACH:-3}"
run_part record 900 "$here/record.sh" "${REPS_RECORD:-5}"

python3 "$here/render.py" || failed+=(render)
if [ ${#failed[@]} -gt 0 ]; then
  echo "run-all.sh: failed parts: ${failed[*]}" >&2
  exit 1
fi
