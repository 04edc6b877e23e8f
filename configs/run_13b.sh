#!/usr/bin/env bash
# The reference's run_7b.sh recipe for LLaMA-2 13B + Qwen-VL's ViT-bigG at 448 px (the model behind
# the reference's published eval outputs): the same flags and values (6 epochs, ZeRO-3, lr 1e-3 with
# 10% warmup, MMCA, 9 datasets); only the model changes. The Qwen tower takes the baseline projection only.
#
#   bash configs/run_13b.sh                                 # 8 GPUs, defaults below
#   LLM=/data/Llama-2-13b-hf VISION_MODEL=/data/Qwen-VL-Chat bash configs/run_13b.sh --max_steps 100
#
# Nothing is downloaded: LLM and VISION_MODEL are local Hugging Face directories, as in the reference's
# recipe (LLM=.../Llama-2-13b-hf, VISION_MODEL=.../Qwen-VL-Chat, downloaded beforehand from
# meta-llama/Llama-2-13b-hf and Qwen/Qwen-VL-Chat). vchat builds the model from them as the reference does
# (the tokenizer gets "### Image:" and "<image>", the embeddings are resized, lang_embed is a copy,
# the projection is new); the vision tower's kind comes from its own config and tensors
# (--vision_model_type clip|qwen overrides). Under ZeRO-3 the model is built inside zero.Init, so no
# GPU ever holds it whole. LLM may also be a vchat checkpoint directory or a preset name from
# vchat/config.py (random weights); TOKENIZER then names a tokenizer.json.
# point it at a qwen-clip directory).
# DS_CONFIG may name one of configs/ds_*.json (e.g. ds_zero3_offload.json on smaller GPUs).
set -euo pipefail

LLM=${LLM:-./Llama-2-13b-hf}
VISION_MODEL=${VISION_MODEL:-./Qwen-VL-Chat}
TOKENIZER=${TOKENIZER:-}  # empty: the LLM directory's own tokenizer
DATA_PATH=${DATA_PATH:-./data}
NUM_GPUS=${NUM_GPUS:-8}
DS_CONFIG=${DS_CONFIG:-}

EPOCH=6
ZERO_STAGE=3
lr=1e-3

DATA="llava llava_dial otter_mimicit_cgd otter_mimicit_sd otter_mimicit_sn otter_mimicit_tvc otter_mimicit_vst llava_otter_blend sparkles_dialogue"
DATA_SAMPLE="all"
IMAGE_PER_SAMPLE="3 2 1 1 1 1 1 1 1"

DATA_CONCATE="${DATA// /_}"
DATA_SAMPLE_CONCATE="${DATA_SAMPLE// /_}"
IMAGE_CONCATE="${IMAGE_PER_SAMPLE// /_}"
OUTPUT=${OUTPUT:-./output/13b_Epoch${EPOCH}_LR${lr}_data_${DATA_CONCATE}_${DATA_SAMPLE_CONCATE}_${IMAGE_CONCATE}}
mkdir -p "$OUTPUT"

deepspeed --num_gpus "$NUM_GPUS" --module vchat_torch.train --max_seq_len 4096 \
    --data_path "$DATA_PATH" --dataset_names $DATA --dataset_samples $DATA_SAMPLE \
    --dataset_concatenate_samples $IMAGE_PER_SAMPLE --max_num_image_per_sample 8 \
    --lm_model_name_or_path "$LLM" \
    --vision_model_name_or_path "$VISION_MODEL" \
    ${TOKENIZER:+--tokenizer "$TOKENIZER"} \
    --gradient_checkpointing --vis_proj baseline \
    --gradient_accumulation_steps 1 --zero_stage $ZERO_STAGE --learning_rate $lr --num_warmup_steps 0.1 \
    --per_device_train_batch_size 1 --per_device_eval_batch_size 2 --output_dir "$OUTPUT" \
    --num_train_epochs $EPOCH --enable_mmca_attention \
    --enable_tensorboard \
    ${DS_CONFIG:+--deepspeed_config "$DS_CONFIG"} "$@" 2>&1 | tee "$OUTPUT/training.log"
