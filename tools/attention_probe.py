#!/usr/bin/env python3
"""Where do a CogVideoX transformer's video tokens look? (a diagnostic for vdit's Shapes World models)

CogVideoX attends jointly over [text tokens; video tokens], so the only way a caption reaches
the video is the attention mass the video queries put on the text keys. For Shapes World clips
sampled by `vdit world sample` (as tools/text_use_probe.py reads them), encodes each clip with
the model's VAE (posterior mean, scaled), noises it at a few timesteps, runs the transformer with
an attention processor that keeps the softmax weights, and prints per layer the mean mass of
the video queries on the caption's tokens, on the padding, on the video, and on the colour
words (with the per-head split). For reference, a uniform attention gives each of the
max_text_seq_length + video tokens 1 / (their number).

    vdit world sample --split train --count 16 --out /tmp/clips16
    python tools/attention_probe.py /tmp/clips16 models/vdit-shapes [more model folders]

Needs torch + diffusers (see shared/bench/README.md for the reference environment).
"""
import os
import sys

import torch
from diffusers import CogVideoXPipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from text_use_probe import load_clips  # noqa: E402

TIMESTEPS = [300, 600, 900]
COLOURS = {"red", "green", "blue", "yellow", "cyan", "magenta", "white", "orange", "purple", "pink"}


class KeepWeights:
    """CogVideoX's joint attention written out, keeping the video queries' weights."""

    def __init__(self, store):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None or image_rotary_emb is not None:
            raise SystemExit("attention_probe: only models with sin-cos positions and no mask are supported")
        text_len = encoder_hidden_states.size(1)
        x = torch.cat([encoder_hidden_states, hidden_states], 1)
        b = x.size(0)
        head_dim = attn.to_k.out_features // attn.heads
        q, k, v = [p(x).view(b, -1, attn.heads, head_dim).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v)]
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        w = (q @ k.transpose(-1, -2) * head_dim**-0.5).softmax(-1)  # [B, H, S, S]
        self.store.append(w[:, :, text_len:])
        out = (w @ v).transpose(1, 2).reshape(b, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, text_len:], out[:, :text_len]


def probe(model, caps, clips, max_len=32):
    p = CogVideoXPipeline.from_pretrained(model)
    store = []
    for block in p.transformer.transformer_blocks:
        block.attn1.set_processor(KeepWeights(store))
    texts = [c["caption"] for c in caps]
    ids = p.tokenizer(texts, padding="max_length", max_length=max_len, truncation=True).input_ids
    kinds = torch.zeros(3, len(texts), max_len)  # caption, pad, colour word
    for i, row in enumerate(ids):
        for j, tok in enumerate(p.tokenizer.convert_ids_to_tokens(row)):
            kinds[1 if tok == "<pad>" else 0, i, j] = 1
            kinds[2, i, j] = float(tok in COLOURS)
    sf = p.vae.config.scaling_factor
    print(model)
    with torch.no_grad():
        z = torch.cat([p.vae.encode(x).latent_dist.mean * sf for x in clips]).permute(0, 2, 1, 3, 4)
        emb = p.encode_prompt(texts, do_classifier_free_guidance=False, max_sequence_length=max_len, device="cpu")[0]
        for t in TIMESTEPS:
            store.clear()
            noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(t))
            zt = p.scheduler.add_noise(z, noise, torch.tensor([t]))
            p.transformer(hidden_states=zt, encoder_hidden_states=emb, timestep=torch.full((len(texts),), t), return_dict=False)
            n_video = store[0].size(-1) - max_len
            print(f"  t={t} (uniform: {1 / (max_len + n_video):.4f} per token); video queries' mass on")
            print("    layer  caption    pad  video | colour words (per head)")
            for layer, w in enumerate(store):
                on_text = w[..., :max_len].mean(2)  # [B, H, L]: mean over the video queries
                mass = [(on_text.mean(1) * kinds[k]).sum(1).mean().item() for k in range(3)]
                per_head = (on_text * kinds[2][:, None]).sum(-1).mean(0)
                video = w[..., max_len:].sum(-1).mean().item()
                heads = " ".join(f"{h:.4f}" for h in per_head.tolist())
                print(f"    {layer:5d}  {mass[0]:.4f} {mass[1]:.4f} {video:.4f} | {mass[2]:.4f} ({heads})")


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    caps, clips, _ = load_clips(sys.argv[1])
    for model in sys.argv[2:]:
        probe(model, caps, clips)


if __name__ == "__main__":
    main()
