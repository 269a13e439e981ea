#!/usr/bin/env bash
# Copies a finished training run into models/vdit-shapes (the default model): the exported
# diffusers folder of the text-to-video run (which holds the VAE it was trained on), the exact
# configs and loss logs of both runs, and keeps the model card and eval reports in place.
#   tools/ship-default-model.sh [runs/vae] [runs/t2v]
set -euo pipefail
vae=${1:-runs/vae}
t2v=${2:-runs/t2v}
dst=models/vdit-shapes
for f in "$t2v/export/model_index.json" "$vae/config.json" "$t2v/config.json"; do
  [ -f "$f" ] || { echo "missing $f: finish (or export with --resume --steps N) the runs first" >&2; exit 1; }
done
for c in vae transformer text_encoder tokenizer scheduler; do
  rm -rf "${dst:?}/$c"
  cp -r "$t2v/export/$c" "$dst/$c"
done
cp "$t2v/export/model_index.json" "$dst/"
[ -f "$t2v/export/generation_config.json" ] && cp "$t2v/export/generation_config.json" "$dst/"
mkdir -p "$dst/training"
cp "$vae/config.json" "$dst/training/vae.json"
cp "$t2v/config.json" "$dst/training/t2v.json"
cp "$vae/loss.jsonl" "$dst/training/vae_loss.jsonl"
cp "$t2v/loss.jsonl" "$dst/training/t2v_loss.jsonl"
[ -f "$vae/loss.png" ] && cp "$vae/loss.png" "$dst/training/vae_loss.png"
[ -f "$t2v/loss.png" ] && cp "$t2v/loss.png" "$dst/training/t2v_loss.png"
du -sh "$dst"
