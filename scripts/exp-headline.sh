#!/usr/bin/env bash
# `dvc exp show` narrowed to what a reviewer compares: per run the test accuracy,
# ED recall with its exact lower bound, ED AUROC and `safe`, and each test condition's
# accuracy, ED recall and ED AUROC (wording.*, complaint.*); from metrics/summary.json
# the count of safe runs, the best run and its test numbers. Extra arguments go to
# dvc, e.g. --md, --only-changed, or --keep '.*lora\.rank' to add a param column.
# DVC names a column `file:key` only when two files share the key, and matches each
# pattern from the column name's start, hence the optional prefix.
set -euo pipefail
per_run='(.*eval\.json:)?((wording|complaint)\.)?(accuracy|ed_recall|ci95\.ed_recall\.low|ed_auroc|safe)$'
summary='(.*summary\.json:)?(n_safe|best|best_test\..*)$'
exec dvc exp show --drop '.*' --keep "Experiment|${per_run}|${summary}" "$@"
