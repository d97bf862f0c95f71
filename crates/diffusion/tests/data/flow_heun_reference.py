"""What diffusers computes for SD 3.5 with FlowMatchHeunDiscreteScheduler on the conformance case's
tiny `sd35` model: whole txt2img runs from given latents, written to flow_heun_reference.safetensors
for crates/diffusion/tests/flow_heun.rs.

Run from the repository root with diffusers 0.42.1 and torch on the path:
  PYTHONPATH=<diffusers> .tools/bin/python crates/diffusion/tests/data/flow_heun_reference.py
"""

import json
import pathlib

import torch
from diffusers import FlowMatchHeunDiscreteScheduler, StableDiffusion3Pipeline
from safetensors.torch import save_file

root = pathlib.Path(__file__).resolve().parents[4]
model = root / "tests/conformance/models/sd35/model"
out = pathlib.Path(__file__).with_name("flow_heun_reference.safetensors")

pipe = StableDiffusion3Pipeline.from_pretrained(model, torch_dtype=torch.float32)
pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
cases = [
    {"prompt": "a photograph of an astronaut riding a horse", "negative_prompt": "blurry", "steps": 3, "cfg": 5.0, "width": 32, "height": 32, "seed": 1},
    {"prompt": "portrait of a cat wearing a tiny hat", "negative_prompt": "", "steps": 5, "cfg": 4.0, "width": 48, "height": 32, "seed": 2},
]
tensors = {}
for i, c in enumerate(cases):
    g = torch.Generator("cpu").manual_seed(c["seed"])
    latents = torch.randn((1, 16, c["height"] // 4, c["width"] // 4), generator=g)
    image = pipe(
        prompt=c["prompt"],
        negative_prompt=c["negative_prompt"],
        num_inference_steps=c["steps"],
        guidance_scale=c["cfg"],
        width=c["width"],
        height=c["height"],
        latents=latents.clone(),
        max_sequence_length=32,
        output_type="np",
    ).images[0]
    tensors[f"{i}.latents"] = latents.contiguous()
    tensors[f"{i}.image"] = torch.from_numpy(image).contiguous()
import diffusers
save_file(tensors, out, metadata={"cases": json.dumps(cases), "diffusers": diffusers.__version__, "torch": torch.__version__, "scheduler": json.dumps(dict(pipe.scheduler.config))})
print(out, {k: tuple(v.shape) for k, v in tensors.items()})
