#!/bin/sh
# Per-allocation cost of the stack walk: the default (.eh_frame tables) vs --frame-pointers,
# on N malloc/free pairs at stack depth 10 (bench/unwind_depth.c, built with frame pointers so
# that both walks see the same frames). Prints, for each mode, the workload's wall-clock ns per
# malloc/free pair and the BPF program's own run time per pair (kernel.bpf_stats_enabled), then
# the differences. Usage: bench/unwind_cost.sh [N] [rounds]   (root, after cargo build --release)
set -eu
N=${1:-200000}
ROUNDS=${2:-3}
here=$(cd "$(dirname "$0")" && pwd)
memleak="$here/../target/release/memleak"
tmp=$(mktemp -d)
stats_before=$(sysctl -n kernel.bpf_stats_enabled)
trap 'sysctl -q -w kernel.bpf_stats_enabled="$stats_before"; rm -rf "$tmp"' EXIT
sysctl -q -w kernel.bpf_stats_enabled=1
gcc -O2 -fno-omit-frame-pointer -o "$tmp/unwind_depth" "$here/unwind_depth.c"

# One traced run: prints "<wall ns per pair> <BPF ns per pair>".
traced() {
	rm -f "$tmp/in" "$tmp/out"
	mkfifo "$tmp/in"
	"$memleak" "$@" -c "$tmp/unwind_depth $N wait" <"$tmp/in" >"$tmp/out" 2>"$tmp/err" &
	pid=$!
	exec 3>"$tmp/in"
	# The workload prints its time when its loop is done (a handshake, polled).
	tries=0
	until grep -qs "^ns per pair" "$tmp/out"; do
		tries=$((tries + 1))
		if [ $tries -gt 1200 ]; then echo "timeout" >&2; cat "$tmp/err" >&2; exit 1; fi
		sleep 0.1
	done
	# The uprobe program's statistics, from memleak's own descriptors (fdinfo of a BPF program).
	bpf=$(python3 -c '
import glob, sys
pid, n = sys.argv[1], int(sys.argv[2])
seen = {}
for f in glob.glob(f"/proc/{pid}/fdinfo/*"):
    try:
        kv = dict(l.split(":", 1) for l in open(f) if ":" in l)
    except OSError:
        continue
    if kv.get("prog_type", "").strip() == "2":  # BPF_PROG_TYPE_KPROBE: the uprobe program
        seen[kv["prog_id"].strip()] = int(kv["run_time_ns"])
print(round(sum(seen.values()) / n) if seen else "?")
' "$pid" "$N")
	echo >&3
	exec 3>&-
	wait "$pid"
	echo "$(sed -n 's/^ns per pair: //p' "$tmp/out") ${bpf:-?}"
}

best() { # the lowest of ROUNDS runs, of each column on its own
	awk 'NR == 1 || $1 < w { w = $1 } NR == 1 || $2 < b { b = $2 } END { print w, b }'
}

untraced=$("$tmp/unwind_depth" "$N" | sed -n 's/^ns per pair: //p')
fp=$(for _ in $(seq "$ROUNDS"); do traced --frame-pointers; done | best)
tables=$(for _ in $(seq "$ROUNDS"); do traced; done | best)
set -- $fp
fp_wall=$1 fp_bpf=$2
set -- $tables
tb_wall=$1 tb_bpf=$2
echo "N = $N malloc/free pairs at stack depth 10; the best of $ROUNDS runs, each column"
echo "untraced:          wall $untraced ns per pair"
echo "--frame-pointers:  wall $fp_wall ns per pair, BPF program $fp_bpf ns per pair"
echo "tables (default):  wall $tb_wall ns per pair, BPF program $tb_bpf ns per pair"
echo "tables - frame pointers: BPF $((tb_bpf - fp_bpf)) ns, wall $((tb_wall - fp_wall)) ns per allocation"
