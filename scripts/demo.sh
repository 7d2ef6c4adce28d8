#!/usr/bin/env bash
# A bounded demo of the study, run as a DVC experiment so params.yaml keeps the
# full study: the offline SmolLM2-135M at 4 and 8 bit, one standard and one
# safety-enhanced config, 60 LoRA steps each, evaluation on both test conditions
# with MC dropout, the zero-shot baselines, the floors (TF-IDF and a linear probe
# per variant), the constant reference rules and the report.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! git rev-parse --verify -q HEAD >/dev/null; then
  echo "make demo needs a git checkout with at least one commit (DVC experiments are git-based)." >&2
  exit 1
fi

started=$(date +%s)
# Bounds (all overridable by editing this list): 500 training cases; a wording test of 200
# cases (a paired accuracy difference near 0.1 is resolvable there) and a complaint test of 40;
# validation of 40 + 30 cases; 60 steps per run instead of 800/1200 at a 5.0e-4 peak learning
# rate and label weight 5 (the recipe docs/results.md measured); validation at steps 0 and 60
# on 2 batches, train accuracy on 32 of the run's cases instead of 64; 2 MC-dropout samples
# per case instead of 50 (enough to show the machinery, not to estimate uncertainty).
dvc exp run \
  -S 'run.models=[smollm2-135m]' \
  -S 'run.bits=[4bit,8bit]' \
  -S 'run.configs=[medical_baseline,balanced_safe]' \
  -S 'data.n_examples=500' \
  -S 'data.conditions.wording.valid=40' -S 'data.conditions.wording.test=200' \
  -S 'data.conditions.complaint.valid=30' -S 'data.conditions.complaint.test=40' \
  -S 'lora.iters=60' -S 'lora.learning_rate=5.0e-4' -S 'train.label_weight=5.0' \
  -S 'train.steps_per_report=10' -S 'train.steps_per_eval=60' -S 'train.steps_per_save=30' \
  -S 'train.val_batches=2' -S 'train.fit_sample=32' \
  -S 'evaluate.mc_samples=2'
elapsed=$(( $(date +%s) - started ))

echo
echo "Demo finished in $((elapsed / 60)) min $((elapsed % 60)) s. Report: reports/report.md"
echo "Metrics: dvc metrics show   Plots: dvc plots show   Experiments: dvc exp show"
echo "params.yaml now holds the demo selection (as every 'dvc exp run -S' does); 'git checkout params.yaml' restores the full study."
echo
sed -n '1,40p' reports/report.md
echo
python - <<'PY'
import json

study = json.load(open("reports/study.json"))
if study["best"] is None:
    print(
        "Issue 29's demo target, a chosen run better than tfidf-logreg on wording accuracy, is not met: "
        "no run is eligible (see above). The recipe learns only after 200-400 steps, the demo trains 60; "
        "the full-length runs are in docs/results.md."
    )
PY
