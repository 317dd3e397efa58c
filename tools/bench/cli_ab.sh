#!/usr/bin/env bash
# tools/bench/cli_ab.sh AUTOTLS_A AUTOTLS_B [ROUNDS]: A/B wall time of `autotls issue` for one
# name, two builds (or one build twice, with CLI_AB_ENV_A / CLI_AB_ENV_B: environment
# assignments such as "LD_BIND_NOW=1" for one side) against one private Pebble (pebble_lib.sh,
# as cli.sh). One untimed warm-up issuance (registers the account), then ROUNDS (20) rounds;
# each round runs A and B once, the order alternating between rounds, so that the load of the
# machine (other builds on its 2 cores) falls on both sides alike. Prints the median and mean
# wall time, the median CPU time (GNU time, %U + %S) and the peak RSS of each side, and the
# load average. autotls runs exactly as in cli.sh (--quiet, http-01 standalone responder).
set -euo pipefail
a="${1:?usage: cli_ab.sh AUTOTLS_A AUTOTLS_B [ROUNDS]}"
b="${2:?usage: cli_ab.sh AUTOTLS_A AUTOTLS_B [ROUNDS]}"
rounds="${3:-20}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BENCH_NAME=cli-ab
# shellcheck source=tools/bench/pebble_lib.sh
source "$root/tools/bench/pebble_lib.sh"
bench_install pebble time
bench_scratch
bench_pebble
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

run() {  # run ENV BIN NAME: "WALL_S RSS_KIB USER_S SYS_S" on stdout
  local t0 t1
  t0=$EPOCHREALTIME
  # shellcheck disable=SC2086  # ENV is a list of assignments
  /usr/bin/time -f "%M %U %S" -o "$tmp/rss" env $1 "$2" issue --ca "$directory" --ca-bundle "$tmp/ca.pem" \
    --storage "$tmp/autotls" --agree-tos --email bench@example.test --quiet -d "$3" \
    --challenge http-01 --http-address "127.0.0.1:$p_http" --key-type ec256 >>"$tmp/autotls.log" 2>&1 || true
  t1=$EPOCHREALTIME
  [ -s "$tmp/autotls/live/$3/fullchain.pem" ] || { log "no certificate for $3 (see $tmp/autotls.log)"; touch "$tmp/failed"; exit 1; }
  echo "$(echo "$t1 - $t0" | bc) $(tail -n 1 "$tmp/rss")"
}
env_a="${CLI_AB_ENV_A:-CLI_AB=a}"
env_b="${CLI_AB_ENV_B:-CLI_AB=b}"
run "$env_a" "$a" warm.cli-ab.test >/dev/null
: >"$tmp/a"; : >"$tmp/b"
for ((i = 0; i < rounds; i++)); do
  if ((i % 2)); then
    run "$env_a" "$a" "a$i.cli-ab.test" >>"$tmp/a"; run "$env_b" "$b" "b$i.cli-ab.test" >>"$tmp/b"
  else
    run "$env_b" "$b" "b$i.cli-ab.test" >>"$tmp/b"; run "$env_a" "$a" "a$i.cli-ab.test" >>"$tmp/a"
  fi
done
python3 - "$tmp/a" "$tmp/b" "$load_before" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import json, statistics as st, sys
out = {}
for side, path in (("a", sys.argv[1]), ("b", sys.argv[2])):
    rows = [l.split() for l in open(path)]
    wall = [float(r[0]) for r in rows]
    out[side] = {"wall_median_s": round(st.median(wall), 4), "wall_mean_s": round(st.mean(wall), 4),
                 "cpu_median_s": round(st.median(float(r[2]) + float(r[3]) for r in rows), 3),
                 "rss_max_kib": max(int(r[1]) for r in rows), "runs": len(rows)}
out["b_over_a"] = round(out["b"]["wall_median_s"] / out["a"]["wall_median_s"], 3)
out["loadavg"] = {"before": sys.argv[3], "after": sys.argv[4]}
print(json.dumps(out))
PY
