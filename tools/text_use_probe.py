#!/usr/bin/env python3
"""Does a text-to-video model use its captions? (a diagnostic for vdit's Shapes World models)

For Shapes World clips sampled by `vdit world sample` (a folder with captions.jsonl and
<id>/frame_*.png), encodes each clip with the model's VAE (posterior mean, scaled), noises it at
a few timesteps (one fixed noise draw per timestep), and reports the transformer's x0 error with
the right captions, the captions shifted by one clip, and the empty prompt: over all latent cells
and over the cells at an object (a 4x4 pixel footprint per latent frame holding a pixel off the
clip's background colour; the same mask as the trainer's diffusion.object_weight). A model that
uses its text has a lower error with the right captions where the noise hides the objects.

    vdit world sample --split train --count 48 --out /tmp/clips48
    python tools/text_use_probe.py /tmp/clips48 models/vdit-shapes [more model folders]

Needs torch + diffusers (see shared/bench/README.md for the reference environment).
"""
import glob
import json
import sys

import numpy as np
import torch
from diffusers import CogVideoXPipeline
from PIL import Image

BACKGROUNDS = {"black": (10, 10, 10), "gray": (90, 90, 90), "navy": (20, 25, 75), "brown": (75, 45, 25)}
TIMESTEPS = [150, 300, 450, 600, 750, 850, 950]


def load_clips(folder, spatial=4, temporal=4):
    caps = [json.loads(line) for line in open(f"{folder}/captions.jsonl")]
    clips, masks = [], []
    for c in caps:
        frames = sorted(glob.glob(f"{folder}/{c['id']}/frame_*.png"))
        px = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in frames]).astype(np.float32)
        bg = np.array(BACKGROUNDS[c["scene"]["background"]], np.float32)
        obj = np.abs(px - bg).max(-1) > 0.5  # [F, H, W]
        f, h, w = obj.shape
        cells = np.zeros((1 + (f - 1) // temporal, h // spatial, w // spatial), bool)
        for k in range(f):
            j = (k + temporal - 1) // temporal  # causal: frame 0 alone, then groups of 4
            cells[j] |= obj[k].reshape(h // spatial, spatial, w // spatial, spatial).any(axis=(1, 3))
        masks.append(torch.from_numpy(cells))
        clips.append(torch.from_numpy(px / 127.5 - 1).permute(3, 0, 1, 2)[None])  # [1, 3, F, H, W]
    return caps, clips, torch.stack(masks).float()[:, :, None]  # [B, F', 1, h, w]


def probe(model, caps, clips, mask, batch=8):
    p = CogVideoXPipeline.from_pretrained(model)
    sf = p.vae.config.scaling_factor
    with torch.no_grad():
        z = torch.cat([p.vae.encode(x).latent_dist.mean * sf for x in clips]).permute(0, 2, 1, 3, 4)
    n = len(caps)
    enc = lambda prompts: p.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=32, device="cpu")[0]
    right = torch.cat([enc(c["caption"]) for c in caps])
    texts = {"right": right, "shifted": torch.roll(right, 1, 0), "empty": enc([""] * n)}
    ac = p.scheduler.alphas_cumprod
    gen = torch.Generator().manual_seed(0)
    print(model)
    for t in TIMESTEPS:
        a = ac[t]
        noisy = a.sqrt() * z + (1 - a).sqrt() * torch.randn(z.shape, generator=gen)
        row = []
        for name, e in texts.items():
            with torch.no_grad():
                v = torch.cat([
                    p.transformer(hidden_states=noisy[i:i + batch], encoder_hidden_states=e[i:i + batch],
                                  timestep=torch.full((len(noisy[i:i + batch]),), t), return_dict=False)[0]
                    for i in range(0, n, batch)
                ])
            err = (a.sqrt() * noisy - (1 - a).sqrt() * v - z) ** 2
            obj = (err * mask).sum() / (mask.sum() * z.shape[2])
            row.append(f"{name} {err.mean().item():.4f} / {obj.item():.4f}")
        print(f"  t={t:<4} x0 MSE all / object cells: " + " | ".join(row), flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    torch.set_num_threads(1)
    caps, clips, mask = load_clips(sys.argv[1])
    for m in sys.argv[2:]:
        probe(m, caps, clips, mask)
