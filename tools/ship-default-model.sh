#!/usr/bin/env bash
# Copies a finished training run into models/vdit-shapes (the default model): the exported
# diffusers folder of the text-to-video run (which holds the VAE it was trained on), the exact
# configs and loss logs of the runs (named after the run folders, training/<run>.json and
# training/<run>_loss.jsonl.gz, so the logs of earlier legs stay beside them; gzipped to keep
# the folder under 25 MiB, `zcat` reads them), and keeps the model card and eval reports in
# place. A third run, a decoder fine-tune of that VAE (a `stage = "vae"` run with
# model.decoder_of: same encoder, same latents), replaces vae/ with its export.
#   tools/ship-default-model.sh [runs/vae] [runs/t2v] [runs/vae_decoder]
set -euo pipefail
vae=${1:-runs/vae}
t2v=${2:-runs/t2v}
decoder=${3:-}
dst=models/vdit-shapes
for f in "$t2v/export/model_index.json" "$vae/config.json" "$t2v/config.json"; do
  [ -f "$f" ] || { echo "missing $f: finish (or export with --resume --steps N) the runs first" >&2; exit 1; }
done
for c in vae transformer text_encoder tokenizer scheduler; do
  rm -rf "${dst:?}/$c"
  cp -r "$t2v/export/$c" "$dst/$c"
done
if [ -n "$decoder" ]; then
  [ -f "$decoder/export/config.json" ] || { echo "missing $decoder/export: finish the decoder run first" >&2; exit 1; }
  grep -q '"decoder_of"' "$decoder/config.json" || { echo "$decoder is not a decoder_of run" >&2; exit 1; }
  rm -rf "${dst:?}/vae"
  cp -r "$decoder/export" "$dst/vae"
fi
cp "$t2v/export/model_index.json" "$dst/"
if [ -f "$t2v/export/generation_config.json" ]; then
  cp "$t2v/export/generation_config.json" "$dst/"
  # Tuned on the finished model (model card, iteration 9): guidance only at timesteps <= 700.
  # The export writes its keys in order, use_dynamic_cfg last.
  grep -q '"guidance_max_timestep"' "$dst/generation_config.json" ||
    sed -i 's/^  "use_dynamic_cfg": \(true\|false\)$/  "use_dynamic_cfg": \1,\n  "guidance_max_timestep": 700/' "$dst/generation_config.json"
  grep -q '"guidance_max_timestep": 700' "$dst/generation_config.json" || { echo "could not set guidance_max_timestep in $dst/generation_config.json" >&2; exit 1; }
fi
mkdir -p "$dst/training"
for run in "$vae" "$t2v" $decoder; do
  name=$(basename "$run")
  cp "$run/config.json" "$dst/training/$name.json"
  rm -f "$dst/training/${name}_loss.jsonl"
  gzip -9 -n -c "$run/loss.jsonl" > "$dst/training/${name}_loss.jsonl.gz"
  if [ -f "$run/loss.png" ]; then cp "$run/loss.png" "$dst/training/${name}_loss.png"; fi
done
du -sh "$dst"
