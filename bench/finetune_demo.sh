#!/usr/bin/env bash
# Fine-tune stories260K (trained at 512) to 2048 with dprope, full-length and PoSE, on a train
# split of the TinyStories text, then compare perplexity on the held-out split with the
# un-fine-tuned model. Needs `ropekit convert llama2c …` to have written out/s260k (README).
#   bash bench/finetune_demo.sh        (about 3 minutes on 2 cores; writes out/ and bench/results/finetune_demo/)
set -euo pipefail
cd "$(dirname "$0")/.."
R=.venv/bin/ropekit
TEXT=../shared/assets/text/tinystories/tinystories_val_head.txt
mkdir -p out/data bench/results/finetune_demo
head -n 6000 "$TEXT" > out/data/train.txt          # first 6000 lines: training
tail -n +6001 "$TEXT" > out/data/heldout.txt       # the rest: held out
rm -rf out/ft-2k out/ft-2k-pose out/eval-ft-*
/usr/bin/time -f "full-length: %e s wall, %M KB peak RSS" \
  $R finetune out/s260k --data out/data/train.txt --out out/ft-2k --target-length 2048 \
     --steps 30 --global-batch 4 --lr 1e-3 --report-to none
/usr/bin/time -f "PoSE: %e s wall, %M KB peak RSS" \
  $R finetune out/s260k --data out/data/train.txt --out out/ft-2k-pose --target-length 2048 \
     --pose --train-length 512 --steps 30 --global-batch 4 --lr 1e-3 --report-to none
EVAL=(--tasks ppl --lengths 512,1024,2048 --data out/data/heldout.txt)
$R eval out/s260k "${EVAL[@]}" --method none --method dprope --target-length 2048 --out out/eval-ft-base
$R eval out/ft-2k "${EVAL[@]}" --out out/eval-ft-full
$R eval out/ft-2k-pose "${EVAL[@]}" --out out/eval-ft-pose
.venv/bin/python bench/finetune_table.py
