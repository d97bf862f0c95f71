# PyTorch + diffusers anchors on the same GPU, random weights of the real geometry, f16.
import json, sys, time, torch
from diffusers import UNet2DConditionModel, AutoencoderKL

def med(f, runs=10):
    f(); torch.cuda.synchronize()
    ts = []
    for _ in range(runs):
        s = time.perf_counter(); f(); torch.cuda.synchronize(); ts.append((time.perf_counter() - s) * 1000)
    ts.sort(); return ts[len(ts) // 2]

dev, dt = "cuda", torch.float16
with torch.no_grad():
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).to(dev, dt).eval()
    x = torch.randn(2, 4, 64, 64, device=dev, dtype=dt); t = torch.tensor([500, 500], device=dev)
    ctx = torch.randn(2, 77, 768, device=dev, dtype=dt)
    print(json.dumps({"bench": "unet_step", "impl": "diffusers-eager", "geometry": "sd15", "median_ms": med(lambda: unet(x, t, ctx))}))
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"]*4,
                        up_block_types=["UpDecoderBlock2D"]*4, layers_per_block=2, latent_channels=4).to(dev, dt).eval()
    z = torch.randn(1, 4, 64, 64, device=dev, dtype=dt)
    # The 30-step job as StableDiffusionPipeline runs it (DPM++ 2M, CFG 7, f16 VAE decode), less
    # the text encoding (a few ms; the conditioning is given).
    from diffusers import DPMSolverMultistepScheduler
    sched = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ctx1 = ctx
    def txt2img():
        sched.set_timesteps(30, device=dev)
        lat = torch.randn(1, 4, 64, 64, device=dev, dtype=dt) * sched.init_noise_sigma
        for step_t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([lat] * 2), step_t)
            u, c = unet(inp, step_t, ctx1).sample.chunk(2)
            lat = sched.step(u + 7.0 * (c - u), step_t, lat).prev_sample
        return vae.decode(lat / 0.18215).sample
    print(json.dumps({"bench": "txt2img_full", "impl": "diffusers-eager", "geometry": "sd15", "steps": 30, "median_ms": med(txt2img, runs=3)}))
    del unet; torch.cuda.empty_cache()
    print(json.dumps({"bench": "vae_decode", "impl": "diffusers-eager", "dtype": "f16", "median_ms": med(lambda: vae.decode(z))}))
    vae32 = vae.to(torch.float32); z32 = z.float()
    print(json.dumps({"bench": "vae_decode", "impl": "diffusers-eager", "dtype": "f32", "median_ms": med(lambda: vae32.decode(z32))}))
    del vae, vae32; torch.cuda.empty_cache()
    xl = UNet2DConditionModel(sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=2048,
        attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816).to(dev, dt).eval()
    x = torch.randn(2, 4, 128, 128, device=dev, dtype=dt); ctx = torch.randn(2, 77, 2048, device=dev, dtype=dt)
    cond = {"text_embeds": torch.randn(2, 1280, device=dev, dtype=dt), "time_ids": torch.tensor([[1024., 1024, 0, 0, 1024, 1024]] * 2, device=dev, dtype=dt)}
    print(json.dumps({"bench": "unet_step", "impl": "diffusers-eager", "geometry": "sdxl", "median_ms": med(lambda: xl(x, t, ctx, added_cond_kwargs=cond))}))
    print(json.dumps({"peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9}))
