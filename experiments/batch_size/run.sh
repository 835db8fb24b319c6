#!/usr/bin/env bash
# Batch-size study (README "Performance"): the per-query objective (train=fast, variant=same_nib)
# at B = 1, 8, 16, 32 queries per step, equal epochs, learning rate scaled by sqrt(B) from the
# study's 1e-5 at B=1. Same data and eval slice as experiment=seed_grid. Then: embft report batch_size
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/ag_news}
for pair in 1:1e-5 8:2.8e-5 16:4e-5 32:5.7e-5; do
  b=${pair%%:*} lr=${pair##*:}
  python -m embft experiment=seed_grid name=batch_size variant=same_nib train=fast \
    train.same_dataset_batch_size="$b" train.learning_rate="$lr" data.local_dir="$DATA"
done
