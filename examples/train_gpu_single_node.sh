#!/usr/bin/env bash
# One node, 8 GPUs: continued pre-training of Llama-3-8B (converted with `megalign convert`, or from scratch
# without --load), tensor parallel 2 with sequence parallelism, data parallel 4, distributed optimizer, bf16,
# flash-attn when installed.
#
# Memory per GPU (`megalign estimate-memory --model-preset llama3-8b --layouts 2x1x4 --seq-length 8192
#   --use-distributed-optimizer --sequence-parallel`): weights 7.5 GiB, grads 15.0, optimizer 11.2,
#   activations 19.9 -> 53.6 GiB, inside an 80 GiB H100/A100. TP 4 x DP 2 needs 32.4 GiB.
#
#   DATA="0.7 data/aligned_text_document 0.3 data/original_text_document" TOKENIZER=llama3/ \
#   LOAD=checkpoints/llama3-8b-tp2 bash examples/train_gpu_single_node.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA:?set DATA to one prefix or weighted prefixes}" "${TOKENIZER:?set TOKENIZER to the HF tokenizer folder}"
SAVE=${SAVE:-checkpoints/llama3-8b-aligned}
LOAD_FLAGS=()
[ -n "${LOAD:-}" ] && LOAD_FLAGS=(--load "$LOAD" --finetune)

# shellcheck disable=SC2086  # DATA holds several words on purpose
torchrun --standalone --nproc-per-node 8 pretrain_gpt.py \
    --model-preset llama3-8b --seq-length 8192 --micro-batch-size 1 --global-batch-size 512 \
    --tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer --overlap-grad-reduce \
    --bf16 --attention-backend auto --recompute-granularity selective \
    --data-path $DATA --split 995,5,0 --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" \
    --lr 2e-5 --min-lr 2e-6 --lr-decay-style cosine --lr-warmup-iters 100 --train-iters 5000 \
    --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 \
    --save "$SAVE" --save-interval 500 --keep-last 3 --eval-interval 500 --eval-iters 20 --log-interval 10 \
    --tensorboard-dir "$SAVE/tensorboard" "${LOAD_FLAGS[@]}"
