#!/bin/bash
# Issue 18's benchmarks for several versions of the library in one run (the record:
# experiments/results/bench_estimators/bench_2026-12-04_quiet.txt). Usage, from the repository root:
#   git archive 36f72b0 hmoe_sim | tar -x -C /tmp/lib_before      # before issue 18
#   git archive c21b4eb hmoe_sim | tar -x -C /tmp/lib_start       # start of the second session
#   bash experiments/bench_hmoe_versions.sh "before issue 18:/tmp/lib_before" "start:/tmp/lib_start" "now:$PWD" > out.txt
# Every version runs this checkout's bench script (experiments/bench_estimators.py) on both HMoE models; the
# last one is also compared fit by fit with the one before it (--reference-rss) and runs the flat model.
# Then the end-to-end sweep: the 2026-11 hora_truths.toml cut to truths 1 and 2 (48 cells), --jobs 2, for the
# first and the last version; with E2E_FULL=1 also the whole 2026-11 config (144 cells: the measure, about
# 5 minutes before issue 18).
set -u
versions=("$@")
work=$(mktemp -d)
stamp() { echo "$(date -u +%H:%M) UTC; $(uptime | sed 's/.*load/load/')"; }
bench() {  # label, library, args...
  local label=$1 lib=$2; shift 2
  echo "# ---- $label: PYTHONPATH=$lib python experiments/bench_estimators.py $* ($(stamp))"
  PYTHONPATH=$lib python experiments/bench_estimators.py "$@" 2>&1
  echo "# uptime after: $(stamp)"
}
# N_SETS, N and SKIP_E2E=1 shrink the run for a smoke test; the record uses the defaults. REPEAT=K times every
# benchmark K times (medians and ranges; bench_estimators.py --repeat)
common=(--n-sets "${N_SETS:-16}" --n "${N:-10000}" --threads 2 --scipy-sets 0 --no-profile --repeat "${REPEAT:-1}")
for model in hmoe-shared hmoe-nonshared; do
  for i in "${!versions[@]}"; do
    label=${versions[$i]%%:*}; lib=${versions[$i]#*:}
    extra=(--save-rss "$work/rss_${model}_$i.json")
    [ "$i" -gt 0 ] && extra+=(--reference-rss "$work/rss_${model}_$((i - 1)).json")
    bench "$label" "$lib" --model "$model" "${common[@]}" "${extra[@]}"
  done
done
last=${versions[-1]}
bench "${last%%:*}" "${last#*:}" --model softmax-linear "${common[@]}"
[ "${SKIP_E2E:-0}" = 1 ] && { echo "# done $(stamp)"; exit 0; }
git show 36f72b0:experiments/configs/hora_truths.toml | sed 's/^seeds = \[1, 2, 3, 4, 5, 6, 7, 8\]/seeds = [1, 2]/;
  s/^truth_seeds = \[1, 2, 3, 4\]/truth_seeds = [1, 2]/; s/^name = "hora_truths"/name = "hora_truths_subset"/' > "$work/subset.toml"
git show 36f72b0:experiments/configs/hora_truths.toml > "$work/full.toml"
end_to_end() {  # config file, its description
  echo "# ==== end to end: $2, --jobs 2"
  for v in "${versions[0]}" "$last"; do
    label=${v%%:*}; lib=${v#*:}
    rm -rf "$work/run"
    echo "# $label ($(stamp))"
    ( cd "$work" && OMP_NUM_THREADS=1 PYTHONPATH=$lib /usr/bin/time -f "$label: %e s wall, %U s user, %S s sys" \
        python -m hmoe_sim.cli sweep "$1" --out run --jobs 2 --no-progress > /dev/null )
  done
}
end_to_end subset.toml "the 48-cell subset of the 2026-11 hora_truths config (truths 1 and 2, all four series)"
[ "${E2E_FULL:-0}" = 1 ] && end_to_end full.toml "the whole 2026-11 hora_truths config (144 cells: H = 2 on truths 1-8, H = 4 on 1-4)"
echo "# done $(stamp)"
