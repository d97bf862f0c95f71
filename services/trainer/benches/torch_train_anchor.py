# PyTorch + diffusers anchor for LoRA training on the same GPU: SD1.5 UNet geometry (random
# weights), batch 4, 512² (64² latents), LoRA rank 16 on to_q/to_k/to_v/to_out.0 (what peft's
# LoraConfig(target_modules=[...]) adds: x·Aᵀ·Bᵀ·alpha/r beside each frozen Linear), bf16 autocast,
# f32 LoRA weights, AdamW. Prints median step ms and peak allocated memory as a JSON line.
import json, time, torch
from diffusers import UNet2DConditionModel

dev = "cuda"
torch.manual_seed(0)
unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).to(dev)
unet.requires_grad_(False)

class LoRA(torch.nn.Module):
    def __init__(self, base, r=16, alpha=16):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.down = torch.nn.Linear(base.in_features, r, bias=False, device=dev)
        self.up = torch.nn.Linear(r, base.out_features, bias=False, device=dev)
        torch.nn.init.zeros_(self.up.weight)
    def forward(self, x):
        return self.base(x) + self.up(self.down(x)) * self.scale

params = []
for name, mod in list(unet.named_modules()):
    for child in ["to_q", "to_k", "to_v"]:
        if hasattr(mod, child) and isinstance(getattr(mod, child), torch.nn.Linear):
            l = LoRA(getattr(mod, child)); setattr(mod, child, l); params += list(l.down.parameters()) + list(l.up.parameters())
    if hasattr(mod, "to_out") and isinstance(mod.to_out, torch.nn.ModuleList) and isinstance(mod.to_out[0], torch.nn.Linear):
        l = LoRA(mod.to_out[0]); mod.to_out[0] = l; params += list(l.down.parameters()) + list(l.up.parameters())
opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
b = 4
lat = torch.randn(b, 4, 64, 64, device=dev); ctx = torch.randn(b, 77, 768, device=dev)
ac = torch.linspace(0.9991, 0.0047, 1000, device=dev)

def step():
    t = torch.randint(0, 1000, (b,), device=dev)
    noise = torch.randn_like(lat)
    a = ac[t].view(b, 1, 1, 1)
    noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
    with torch.autocast("cuda", dtype=torch.bfloat16):
        pred = unet(noisy, t, ctx).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

for _ in range(3):
    step()
torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
ts = []
for _ in range(20):
    s = time.perf_counter(); step(); torch.cuda.synchronize(); ts.append((time.perf_counter() - s) * 1000)
ts.sort()
print(json.dumps({"bench": "sd15_lora_step", "impl": "diffusers-eager+lora", "dtype": "bf16-autocast",
                  "batch": b, "pixels": 512, "rank": 16, "lora_params": sum(p.numel() for p in params),
                  "median_ms": ts[len(ts) // 2], "peak_gib": torch.cuda.max_memory_allocated() / 2**30}))
