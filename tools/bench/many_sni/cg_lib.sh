# cg_lib.sh: shared by cg_many.sh and cg_cold.sh (source it after setting bin, port, secs, out
# and vp, the pid of the tls_bench running under callgrind).
# measure LABEL CLIENT-ARGS...: zero the counters (callgrind_control -z), run one client thread for
# SECS, dump (-d LABEL), print the window's handshakes and Ir total, and append
# "LABEL HANDSHAKES DUMP-FILE" to $out.counts.
measure() {
  local label=$1; shift
  callgrind_control -z "$vp" >/dev/null
  local r h f
  r=$("$bin" client --port "$port" --threads 1 --secs "$secs" "$@")
  callgrind_control -d "$label" "$vp" >/dev/null
  h=$(echo "$r" | python3 -c "import json,sys; print(json.load(sys.stdin)['handshakes'])")
  f=$(ls -t "$out.$vp".* | head -1)
  echo "$label handshakes=$h file=$f"
  callgrind_annotate "$f" 2>/dev/null | grep -E "^ *Events shown|PROGRAM TOTALS" | head -2
  echo "$label $h $f" >> "$out.counts"
}
