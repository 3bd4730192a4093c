"""Train a tiny DDPM with diffusers alone and save it with diffusers' own ``save_pretrained``.

It stands for a model trained anywhere: a plain PyTorch loop (not trilemma's) on the synthetic images
of ``suite.yaml``, which then measures the saved folder through ``weights:``, training nothing. From
this folder, with this package installed (``pip install -e .``) or on ``PYTHONPATH``:

    python train_tiny.py --out tiny-ddpm --steps 200
    trilemma run suite.yaml
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline

from trilemma.contract.family import build_config
from trilemma.contract.likelihood import to_signed
from trilemma.run.data import DataConfig, load_labeled
from trilemma_diffusers.ddpm import DiffusersDDPM, make_scheduler, make_unet

# The data set of suite.yaml: the FID is measured against the images the model learned.
DATA = DataConfig(name="synthetic", synthetic_size=16, synthetic_train=256, synthetic_test=64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tiny-ddpm"), help="the folder to save to")
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--preset", default="tiny", help="the family preset whose UNet to train (tiny)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    images, _ = load_labeled(DATA, "train")  # uint8 (N, 1, 16, 16)
    config = build_config(DiffusersDDPM, args.preset, {})
    unet, scheduler = make_unet(config, tuple(images.shape[1:])), make_scheduler(config)
    optimizer = torch.optim.Adam(unet.parameters(), lr=config.lr)

    # The simple loss of Ho et al.: predict the noise that DDPMScheduler.add_noise mixed in.
    for step in range(args.steps):
        x0 = to_signed(images[torch.randint(0, len(images), (args.batch,))])  # (B, 1, 16, 16) in [-1, 1]
        noise = torch.randn_like(x0)
        t = torch.randint(0, config.timesteps, (args.batch,))
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f}")

    # diffusers' own format: unet/ (config.json, safetensors weights), scheduler/, model_index.json.
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
