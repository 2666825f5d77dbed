#!/usr/bin/env bash
# Split a model file into parts of at most SIZE (split -b syntax), for a machine reached only by
# transfers smaller than the file (the GPU machine: 64 MiB per call; SmolLM2's GGUF is 98 MB). Carry one
# part per call of one warm lease, copying each to the same scratch folder there; then
#   lemo fetch-model smollm2-135m --gguf 'SCRATCH/*.part*' --out CKPT
# joins the parts, checks the sha256 and writes the checkpoint.
# Usage: split_weights.sh FILE OUT_DIR [SIZE=52M]
set -euo pipefail
file=${1:?usage: split_weights.sh FILE OUT_DIR [SIZE]}; out=${2:?usage: split_weights.sh FILE OUT_DIR [SIZE]}
mkdir -p "$out"
split -b "${3:-52M}" -d "$file" "$out/$(basename "$file").part"
ls -l "$out"
