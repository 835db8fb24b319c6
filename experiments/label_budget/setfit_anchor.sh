#!/usr/bin/env bash
# The SetFit paper's protocol (Tunstall et al. 2022; its repository's final_results), run by embft: the base
# all-MiniLM-L6-v2, 8 labelled texts per class, SetFit's defaults of then (20 pairs per text and iteration:
# train.num_iterations=20; batch 16, body learning rate 2e-5, one epoch; 256 tokens), its logistic head, scored
# on the full test sets; seeds 1..3 draw three training splits. supcon beside it at the same budget (its deployed
# logistic regression fitted on the same 8 texts per class: support_from_training) and the same
# evaluation settings, in fp32 on every machine (bf16 where a CPU has it would be another protocol). Resumable
# (finished jobs skip); then the table of setfit_anchor.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
export EMBFT_AG_NEWS_DIR=${EMBFT_AG_NEWS_DIR:-$PWD/../shared/data/ag_news}
PY=${PYTHON:-.venv/bin/python}
DATA=${DATA:-sst5,emotion,ag_news}
COMMON=(name=setfit_anchor "data=$DATA" train.per_class=8 train.seed=1,2,3 train.query_max_len=256
        train.precision=fp32 eval.precision=fp32 eval.max_seq_length=256 eval.max_test_rows=null tracking.support_from_training=true tracking.support_per_class=null
        tracking.log_model=none tracking.registered_model_name=null)
"$PY" -m embft -m arm=setfit train.num_iterations=20 "${COMMON[@]}"
"$PY" -m embft -m arm=supcon "${COMMON[@]}"
"$PY" experiments/label_budget/setfit_anchor.py
