"""The items of `atelier-engine-bench` on PyTorch from Python (diffusers' UNet2DConditionModel
and AutoencoderKL with the real geometry, random weights): one JSON line per run.

    python engines.py --item unet_sd15|unet_sdxl|vae_decode|txt2img|lora_step
                      [--device cpu|cuda] [--dtype f32|f16|bf16] [--latent N] [--runs N] [--warmup N]
                      [--steps N] [--batch N] [--rank N]

Same work as the Rust items: batch-2 UNet steps, a 1-latent VAE decode, Euler steps with CFG 7.5
and a final decode, and a LoRA step (rank r on the attention projections, AdamW, noise MSE).
"""
import argparse, json, math, resource, time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

p = argparse.ArgumentParser()
p.add_argument("--item", required=True)
p.add_argument("--device", default="cpu")
p.add_argument("--dtype", default=None)
p.add_argument("--latent", type=int, default=None)
p.add_argument("--runs", type=int, default=3)
p.add_argument("--warmup", type=int, default=1)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--batch", type=int, default=1)
p.add_argument("--rank", type=int, default=16)
a = p.parse_args()
dev = a.device
a.dtype = a.dtype or ("f16" if dev == "cuda" else "f32")
dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
a.latent = a.latent or (128 if a.item == "unet_sdxl" else 64)
s = a.latent


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


def med(f, runs):
    for _ in range(a.warmup):
        f(); sync()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter(); f(); sync(); ts.append((time.perf_counter() - t0) * 1000)
    ts.sort()
    return ts[len(ts) // 2]


def sd15():
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def sdxl():
    return UNet2DConditionModel(
        sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
        transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)


def vae():
    return AutoencoderKL(block_out_channels=[128, 256, 512, 512],
                         down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4,
                         layers_per_block=2, latent_channels=4).to(dev).eval()


def sigmas(steps):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    out = [math.sqrt((1 - ac[999 - i * 1000 // steps]) / ac[999 - i * 1000 // steps]) for i in range(steps)]
    return out + [0.0], ac


class LoRA(torch.nn.Module):
    def __init__(self, base, r):
        super().__init__()
        self.base = base
        self.down = torch.nn.Parameter(torch.empty(r, base.in_features, device=dev).uniform_(
            -1 / math.sqrt(base.in_features), 1 / math.sqrt(base.in_features)))
        self.up = torch.nn.Parameter(torch.zeros(base.out_features, r, device=dev))

    def forward(self, x):
        h = x.to(self.down.dtype) @ self.down.T @ self.up.T
        return self.base(x) + h.to(x.dtype)


def lora_step():
    u = sd15().to(dev, dt).train()
    u.requires_grad_(False)
    for name, m in list(u.named_modules()):
        for attn in ("attn1", "attn2"):
            if name.endswith(attn):
                for proj in ("to_q", "to_k", "to_v"):
                    setattr(m, proj, LoRA(getattr(m, proj), a.rank))
                m.to_out[0] = LoRA(m.to_out[0], a.rank)
    params = [p for p in u.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    _, ac = sigmas(1)
    ac = ac.float().to(dev)
    x0 = torch.randn(a.batch, 4, s, s, device=dev)
    ctx = torch.randn(a.batch, 77, 768, device=dev, dtype=dt)

    def step():
        t = torch.randint(0, 1000, (a.batch,), device=dev)
        al = ac[t].view(-1, 1, 1, 1)
        noise = torch.randn_like(x0)
        noisy = x0 * al.sqrt() + noise * (1 - al).sqrt()
        pred = u(noisy.to(dt), t, ctx).sample.float()
        loss = ((pred - noise) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return med(step, a.runs)


def inference():
    with torch.no_grad():
        if a.item in ("unet_sd15", "unet_sdxl"):
            u = (sdxl() if a.item == "unet_sdxl" else sd15()).to(dev, dt).eval()
            x = torch.randn(2, 4, s, s, device=dev, dtype=dt)
            t = torch.tensor([500, 500], device=dev)
            ctx = torch.randn(2, 77, u.config.cross_attention_dim, device=dev, dtype=dt)
            kw = {}
            if a.item == "unet_sdxl":
                px = float(s * 8)
                kw["added_cond_kwargs"] = {
                    "text_embeds": torch.randn(2, 1280, device=dev, dtype=dt),
                    "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * 2, device=dev, dtype=dt)}
            return med(lambda: u(x, t, ctx, **kw), a.runs)
        if a.item == "vae_decode":
            v = vae()
            z = torch.randn(1, 4, s, s, device=dev)
            return med(lambda: v.decode(z), a.runs)
        u, v = sd15().to(dev, dt).eval(), vae()
        ctx = torch.randn(2, 77, 768, device=dev, dtype=dt)
        sg, _ = sigmas(a.steps)

        def txt2img():
            x = torch.randn(1, 4, s, s, device=dev) * sg[0]
            for i in range(a.steps):
                inp = torch.cat([x, x]) / math.sqrt(sg[i] ** 2 + 1)
                t = torch.full((2,), float(999 - i * 1000 // a.steps), device=dev)
                un, co = u(inp.to(dt), t, ctx).sample.float().chunk(2)
                x = x + (un + 7.5 * (co - un)) * (sg[i + 1] - sg[i])
            v.decode(x)
        return med(txt2img, a.runs)


ms = lora_step() if a.item == "lora_step" else inference()
print(json.dumps({
    "bench": a.item, "engine": "pytorch-python", "device": dev, "dtype": a.dtype, "latent": s,
    "pixels": s * 8, "steps": a.steps if a.item == "txt2img" else None,
    "batch": a.batch if a.item == "lora_step" else None, "median_ms": round(ms, 1),
    "runs": a.runs, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    "torch": torch.__version__, "threads": torch.get_num_threads()}))
