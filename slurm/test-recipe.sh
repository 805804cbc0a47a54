#!/bin/bash
# docs/cluster.md's Slurm recipe on a real (local, one-node) Slurm with slurm/tiny.py's tiny preset, checked
# against one uninterrupted call. Needs a running cluster: `bash slurm/local-cluster.sh start`.
#   bash slurm/test-recipe.sh [WORK]      (WORK: a scratch folder, default /tmp/physim-recipe; emptied first)
# (a) a training array of 2 runs, each task stopped mid-training by Slurm's SIGUSR1, requeued and resumed;
# (b) an array of 4 LLC shards after it (afterok), one cancelled mid-estimate by scancel and resubmitted;
# (c) --report; (d) the same preset in one call into another folder: the results must be byte-identical.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
sinfo -h >/dev/null 2>&1 || { echo "no Slurm answers here: bash slurm/local-cluster.sh start" >&2; exit 1; }
WORK=${1:-/tmp/physim-recipe}
rm -rf "$WORK" && mkdir -p "$WORK" && cd "$WORK" || exit 1       # the logs land here
export OMP_NUM_THREADS=1                                # one thread everywhere: the same numbers (tiny.py too)
export PHYSIM_CMD="python $REPO/slurm/tiny.py" PHYSIM_OUT=$WORK/slurm-run
export PHYSIM_TIME_LIMIT=10m     # never reached: here Slurm's SIGUSR1 is what stops the tasks
# Slurm's smallest wall limit is one minute. slurmctld checks limits every 30 s and sends --signal's
# SIGUSR1 up to 30 s early, so @10 arrives 20-50 s into a task, well before the SIGTERM at 60-90 s.
SB=(sbatch --parsable --gres=none --cpus-per-task=1 --time=0:01:00 --signal=B:USR1@10)
t0=$(date +%s); fails=0
say() { echo "[$(($(date +%s) - t0)) s] $*"; }
check() { if eval "$2"; then echo "  ok: $1"; else echo "  FAILED: $1"; fails=$((fails + 1)); fi; }
running() { squeue -h -j "$1" 2>/dev/null | grep -q .; }    # any task of these jobs pending or running
wait_jobs() { while running "$1"; do sleep 2; done; }
field() {   # a field of every task of a job, counted: "COMPLETED x2"
  scontrol show job "$1" | grep -o " $2=[^ ]*" | cut -d= -f2 | sort | uniq -c | awk '{printf "%s%s x%s", s, $2, $1; s=", "}'
}
first() { tr '\r' '\n' < "$2" | grep -a "$1" | head -n 1 | grep -o '20[0-9-]*T[0-9:]*Z'; }   # its UTC time

say "(a) training array: 2 runs, --seeds 2 --no-llc --runs <task>"
train=$("${SB[@]}" --array=0-1 "$REPO/slurm/physim.sbatch" --seeds 2 --no-llc --runs) || exit 1
say "(b) LLC shards 1-4 after it: --dependency=afterok:$train --llc-shard <task>/4"
shards=$("${SB[@]}" --array=1-4 --dependency=afterok:"$train" "$REPO/slurm/physim.sbatch" --llc-shard) || exit 1
wait_jobs "$train"
say "training array $train done: states $(field "$train" JobState), restarts $(field "$train" Restarts)"
for t in 0 1; do
  log=physim-${train}_$t.log
  grep -a -e '^physim.sbatch' -e '^stopped by' -e 'tiny.py' "$log" | sed "s/^/  $log: /"
  check "task $t ran more than once (requeued)" "[ \$(grep -c '^physim.sbatch: start' $log) -ge 2 ]"
  check "task $t was stopped by SIGUSR1 mid-training" "grep -aq '^stopped by SIGUSR1 at step [1-9]' $log"
  # every later start's first checkpoint load must be past step 0
  check "task $t resumed, not restarted from step 0" "awk '/^physim.sbatch: start/ {n++; first=1}
    /tiny.py: .* resumes from step/ && first {first=0; if (n > 1 && \$NF == 0) bad=1; if (n > 1) seen=1}
    END {exit !(seen && !bad)}' $log"
  check "task $t finished (exit 0)" "tail -n 5 $log | grep -q 'the call exited 0'"
done
if [ "$(field "$train" JobState)" != "COMPLETED x2" ]; then   # afterok can never be met: stop here
  scancel "$shards"; say "FAIL: a training task did not finish"; exit 1
fi
trained_at=$(cat physim-"${train}"_*.log | grep -o 'the call exited 0 at .*' | sort | tail -n 1 | awk '{print $NF}')

say "(b) waiting for shard 2 to be mid-estimate, then scancel ${shards}_2"
while ! grep -aq 'LLC at step' "physim-${shards}_2.log" 2>/dev/null && running "${shards}_2"; do sleep 1; done
sleep 4; scancel "${shards}_2"; say "cancelled ${shards}_2"
wait_jobs "$shards"
say "shard array $shards done: states $(field "$shards" JobState), restarts $(field "$shards" Restarts)"
tail -n 3 "physim-${shards}_2.log" | tr '\r' '\n' | grep -a . | tail -n 3 | sed "s/^/  physim-${shards}_2.log: /"
for i in 1 2 3 4; do
  started=$(first 'physim.sbatch: start' "physim-${shards}_$i.log")       # to the second: the same second is fine
  check "shard $i started ($started) once training had ended ($trained_at)" "[[ ! '$started' < '$trained_at' ]]"
done
check "shard 2 was interrupted by the scancel, exit 130" "tr '\r' '\n' < physim-${shards}_2.log | grep -aq '^interrupted' && tail -n 3 physim-${shards}_2.log | grep -q 'the call exited 130'"
ls "$PHYSIM_OUT"/run*/llc/*.pt 2>/dev/null | sed 's/^/  saved chain state: /'
check "the cancelled estimate saved its chains" "ls '$PHYSIM_OUT'/run*/llc/*.pt >/dev/null 2>&1"
again=$("${SB[@]}" --array=2 "$REPO/slurm/physim.sbatch" --llc-shard /4) || exit 1
say "resubmitted shard 2 as job $again: --array=2 ... --llc-shard /4"
wait_jobs "$again"
tr '\r' '\n' < "physim-${again}_2.log" | grep -a -e '^physim.sbatch' -e '^shard' | awk '!/LLC at step/ || !n++' \
  | sed "s/^/  physim-${again}_2.log: /"         # the first progress line shows where the chains resumed
progress() {   # "LLC at step S (g/G): n/3000" -> g * 100000 + n, of the first or last such line of a log
  tr '\r' '\n' < "$2" | grep -ao 'LLC at step [0-9]* ([0-9]*/[0-9]*): [0-9]*' | "$1" -n 1 | tr '(/:)' '    ' \
    | awk '{printf "%d\n", $5 * 100000 + $NF}'
}
before=$(progress tail "physim-${shards}_2.log"); after=$(progress head "physim-${again}_2.log")
check "it continued the saved chains (first progress $after > last before the cancel $before)" \
  "[ '${after:-0}' -gt '${before:-0}' ]"
check "resubmitted shard 2 finished" "grep -aq 'shard 2/4: its' physim-${again}_2.log"
check "its saved chain state is used up and removed" "! ls '$PHYSIM_OUT'/run*/llc/*.pt >/dev/null 2>&1"

say "(c) --report"
python "$REPO/slurm/tiny.py" --report "$PHYSIM_OUT" > report.log 2>&1; rc=$?
check "--report exited $rc: $(tail -n 1 report.log | cut -c1-120)..." "[ $rc -eq 0 ]"
say "(d) the same preset in one uninterrupted call"
python "$REPO/slurm/tiny.py" --seeds 2 --out "$WORK/one-call" > one-call.log 2>&1; rc=$?
check "the one call exited $rc: $(tail -n 1 one-call.log | cut -c1-80)..." "[ $rc -eq 0 ]"
say "comparing"
for f in run0/metrics.csv run0/losses.csv run0/llc.csv run1/metrics.csv run1/losses.csv run1/llc.csv \
         table5.csv claims.json; do
  check "$f identical" "cmp -s '$PHYSIM_OUT/$f' '$WORK/one-call/$f'"
done
say "$([ "$fails" -eq 0 ] && echo PASS || echo "FAIL ($fails checks)")"
[ "$fails" -eq 0 ]
