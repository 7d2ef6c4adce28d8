#!/usr/bin/env bash
# The study on real triage data: the public KTAS emergency-department data (Moon et al.
# 2019, 1,267 visits), end to end, against the nurses who triaged it. A DVC experiment,
# like scripts/demo.sh, so params.yaml keeps the full study ('git checkout params.yaml'
# restores it): SmolLM2-135M at 4 and 8 bit, one standard config (medical_baseline) and
# one safety-enhanced config (balanced_safe), at the configs' own lengths (800 and 1200
# LoRA steps), their zero-shot baselines, the TF-IDF floor, the linear probes, the reference
# rules and the comparison report.
#
# The recipe: the configs' own learning rates (1.0e-5 to 5.0e-5) do not learn the built-in
# cases within their own step counts; a 5.0e-4 peak rate with label weight 5 does (two
# seeds, docs/results.md, "A recipe that learns"). The study on KTAS uses that recipe;
# '-- -S lora.learning_rate=null -S train.label_weight=1.0' trains at the configs' own
# settings instead.
#
# Usage: scripts/ktas-study.sh [--rows N | --tiny] [--dry-run] [KTAS_CSV] [-- DVC_EXP_RUN_ARGS...]
#
#   KTAS_CSV    the KTAS data.csv (';'-separated, cp1254). Without it: $KTAS_CSV, else the
#               copy already at data/raw/ktas/data.csv, else ../shared/data/ktas/data.csv.
#   --rows N    only the first N visits (a quick look at the data path, not a study)
#   --tiny      a quick look at the plumbing: the first 120 visits, 20 LoRA steps at a
#               2.0e-4 peak learning rate, validation on 2 batches, 4 MC-dropout samples
#   --dry-run   put the data in place and check it, print the dvc command, run nothing
#   -- ...      passed on to 'dvc exp run', e.g. -- -S lora.iters=40 -S evaluate.mc_samples=6
#
# The data. DVC tracks data/raw as prepare's dependency, so the file is copied to
# data/raw/ktas/data.csv (with --rows N, its first N visits to data/raw/ktas/first-N.csv).
# A different file already there is never overwritten: the script stops and says so.
# data/raw/ktas/ is git-ignored (.gitignore) and the script refuses to copy anything
# there otherwise: the data must never be committed, nor land in an experiment's commit.
#
# The split (prepare, triage/data/splits.py split_by_group): train/valid/test
# 0.8/0.1/0.1 (data.splits), stratified by the expert's label and fixed by data.seed
# (42), so every run is scored on the same test visits. Groups never straddle two
# splits. In KTAS every visit is its own group: the visits are independent patients.
# The one exception is a visit whose rendered note is identical to an earlier one's
# (the public export repeats 5 rows); it shares that visit's group, so the copy cannot
# sit in train while its twin is in test. (An example with no group at all would also
# be its own group: split_by_group keys it by its id.)
#
# What the model reads: a nurse's note built from the door-side columns only (sex, age,
# arrival, injury, complaint, mental state, pain, vital signs; triage/data/ktas.py).
# The label is KTAS_expert (1-3 ED, 4 GP, 5 HOME). The nurse's own level KTAS_RN is
# never in the prompt: it is stored, mapped the same way, in attrs.nurse_label, the
# human reference row "nurses". attrs.vitals (abnormal/normal/missing) lets the report
# split accuracy by whether the vital signs were abnormal.
set -euo pipefail
caller=$PWD
cd "$(dirname "$0")/.."

usage() { sed -n '10,18p' "$0" | sed 's/^# \{0,1\}//'; }
fail() { printf 'ktas-study: %s\n' "$@" >&2; exit 1; }

rows="" tiny=0 dry_run=0 csv="" extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rows) [ $# -ge 2 ] || fail "--rows needs a number of visits"; rows=$2; shift 2 ;;
    --rows=*) rows=${1#--rows=}; shift ;;
    --tiny) tiny=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    -*) usage >&2; fail "unknown option $1" ;;
    *) [ -z "$csv" ] || fail "one KTAS file only (got '$csv' and '$1')"; csv=$1; shift ;;
  esac
done
if [ "$tiny" = 1 ] && [ -z "$rows" ]; then rows=120; fi
if [ -n "$rows" ] && ! [[ "$rows" =~ ^[1-9][0-9]*$ ]]; then fail "--rows takes a positive whole number, got '$rows'"; fi

if ! command -v dvc >/dev/null 2>&1 && [ -x .venv/bin/dvc ]; then PATH="$PWD/.venv/bin:$PATH"; fi
py=python; command -v python >/dev/null 2>&1 || py=python3

target=data/raw/ktas/data.csv
shared=../shared/data/ktas/data.csv
csv=${csv:-${KTAS_CSV:-}}
case "$csv" in ""|/*) ;; *) csv=$caller/$csv ;; esac   # a relative path is the caller's, not the repo's
if [ -z "$csv" ]; then
  if [ -f "$target" ]; then csv=$target
  elif [ -f "$shared" ]; then csv=$shared
  else
    fail "no KTAS data given, and none at $target or $shared." \
         "Download the KTAS CSV of Moon et al. 2019 (PLOS ONE; 'data.csv', ';'-separated, cp1254)," \
         "then run: scripts/ktas-study.sh /path/to/data.csv   (or KTAS_CSV=/path/to/data.csv scripts/ktas-study.sh)"
  fi
fi
[ -f "$csv" ] || fail "$csv: no such file (the KTAS CSV to study)"

if ! git rev-parse --verify -q HEAD >/dev/null; then
  fail "the study needs a git checkout with at least one commit (DVC experiments are git-based)."
fi
if ! git check-ignore -q "$target"; then
  fail "data/raw/ktas/ is not git-ignored, so the data could be committed; nothing was copied." \
       "Add the line '/data/raw/ktas/' to .gitignore and run this again."
fi

# Put $1's content at $2 unless a different file is already there; $3 names the content.
place() {
  local from=$1 to=$2 what=$3
  if [ -e "$to" ]; then
    if cmp -s "$from" "$to"; then echo "ktas-study: $to already holds this data; using it."; return 0; fi
    fail "$to exists and differs from $what; it is left as it is (this script never overwrites a file in data/raw)." \
         "If it is your own data, run the study on it: scripts/ktas-study.sh $to" \
         "Otherwise move it away (e.g. mv $to $to.old) and run this again."
  fi
  cp "$from" "$to"
  echo "ktas-study: copied $what to $to (git-ignored, never committed)."
}

if [ -n "$rows" ]; then
  path=data/raw/ktas/first-$rows.csv
  staged=$(mktemp)
  trap 'rm -f "$staged"' EXIT
  # The header and the first N visits, read as CSV (a field may hold a newline); undecodable bytes survive.
  "$py" - "$csv" "$staged" "$rows" <<'EOF'
import csv, sys
source, out, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(source, encoding="cp1254", errors="surrogateescape", newline="") as f:
    records = list(csv.reader(f, delimiter=";"))
if len(records) - 1 < rows:
    sys.exit(f"ktas-study: --rows {rows}: {source} has only {len(records) - 1} visits")
with open(out, "w", encoding="cp1254", errors="surrogateescape", newline="") as f:
    csv.writer(f, delimiter=";", lineterminator="\n").writerows(records[: rows + 1])
EOF
else
  staged=$csv path=$target
  # A file already in data/raw/ktas/ (git-ignored, tracked by DVC) is used where it is.
  if [ -d data/raw/ktas ] && [ "$(cd "$(dirname "$csv")" && pwd -P)" = "$(cd data/raw/ktas && pwd -P)" ]; then
    path=data/raw/ktas/$(basename "$csv")
  fi
fi

# Read it the way prepare will before anything is copied, so a bad file stops here with its line and column.
"$py" - "$staged" "$csv" "${rows:-all}" <<'EOF'
import sys
from collections import Counter
from triage.data.ktas import read_ktas_csv
from triage.schema import DataError

staged, source, rows = sys.argv[1:]
try:
    examples = read_ktas_csv(staged)
except DataError as error:
    sys.exit(f"ktas-study: {source}" + ("" if rows == "all" else f" (its first {rows} visits)") +
             f"{str(error).removeprefix(staged)}")
labels = Counter(e.label for e in examples)
nurses = sum("nurse_label" in e.attrs for e in examples)
vitals = Counter(e.attrs["vitals"] for e in examples)
print(f"ktas-study: {source}: {len(examples)} visits; expert label " +
      ", ".join(f"{k} {labels[k]}" for k in ("ED", "GP", "HOME")) +
      f"; nurse's level recorded for {nurses}; vital signs " + ", ".join(f"{k} {v}" for k, v in sorted(vitals.items())))
if nurses < len(examples):
    print("ktas-study: not every visit has the nurse's level (KTAS_RN): the 'nurses' reference row needs it on every case")
EOF

mkdir -p data/raw/ktas
if [ "$staged" -ef "$path" ]; then
  echo "ktas-study: using $path."
else
  place "$staged" "$path" "$(if [ -n "$rows" ]; then echo "the first $rows visits of $csv"; else echo "$csv"; fi)"
fi

bounds=()
if [ "$tiny" = 1 ]; then
  bounds=(-S 'lora.iters=20' -S 'lora.learning_rate=2.0e-4'
          -S 'train.steps_per_report=5' -S 'train.steps_per_eval=10' -S 'train.steps_per_save=10'
          -S 'train.val_batches=2' -S 'evaluate.mc_samples=4')
fi
cmd=(dvc exp run
     -S 'data.source=ktas' -S "data.path=$path"
     -S 'run.models=[smollm2-135m]' -S 'run.bits=[4bit,8bit]'
     -S 'run.configs=[medical_baseline,balanced_safe]'
     -S 'lora.learning_rate=5.0e-4' -S 'train.label_weight=5.0'
     ${bounds[@]+"${bounds[@]}"} ${extra[@]+"${extra[@]}"})

echo "ktas-study: split 0.8/0.1/0.1 stratified by label, fixed by data.seed; every visit its own group (independent patients)."
echo "ktas-study: compared on the test visits: nurses (KTAS_RN), always-ED and majority, TF-IDF floor (tfidf-logreg), zero-shot, fine-tuned."
printf 'ktas-study: running:'; printf ' %q' "${cmd[@]}"; echo
if [ "$dry_run" = 1 ]; then exit 0; fi

started=$(date +%s)
"${cmd[@]}"
elapsed=$(( $(date +%s) - started ))
echo
echo "KTAS study finished in $((elapsed / 3600)) h $((elapsed % 3600 / 60)) min. Report: reports/report.md"
echo "Metrics: dvc metrics show   Experiments: dvc exp show   Data card: data/prepared/card.md"
echo "params.yaml now holds the KTAS selection (as every 'dvc exp run -S' does); 'git checkout params.yaml' restores the full study."
