"""Drives atelier's A1111 routes with webuiapi, the Python client most A1111 scripts use, and
checks each answer against A1111's schema. Run by tests/tests/webuiapi.rs against a gateway with
a tiny SD 1.x model named `tiny`.

    python webuiapi_drive.py HOST PORT KEY
"""

import sys

import webuiapi
from PIL import Image

host, port, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
# A1111's --api-auth is HTTP Basic: atelier takes the API key as the password.
api = webuiapi.WebUIApi(host=host, port=port, username="webuiapi", password=key, steps=3)
checked = []


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    checked.append(name)


def list_of(name, value, keys):
    check(name, isinstance(value, list), repr(value)[:200])
    for item in value:
        missing = [k for k in keys if k not in item]
        check(name, not missing, f"{item} lacks {missing}")
    return value


# Catalogue routes, in A1111's shapes.
list_of("get_samplers", api.get_samplers(), ["name", "aliases", "options"])
list_of("get_schedulers", api.get_schedulers(), ["name", "label", "aliases", "default_rho", "need_inner_model"])
list_of("get_upscalers", api.get_upscalers(), ["name", "model_name", "model_path", "model_url", "scale"])
list_of("get_latent_upscale_modes", api.get_latent_upscale_modes(), ["name"])
models = list_of("get_sd_models", api.get_sd_models(), ["title", "model_name", "hash", "sha256", "filename", "config"])
check("get_sd_models", [m["model_name"] for m in models] == ["tiny"], models)
vaes = list_of("get_sd_vae", api.get_sd_vae(), ["model_name", "filename"])
check("get_sd_vae", [v["model_name"] for v in vaes] == ["warm.safetensors"], vaes)
list_of("get_hypernetworks", api.get_hypernetworks(), ["name", "path"])
list_of("get_face_restorers", api.get_face_restorers(), ["name", "cmd_dir"])
list_of("get_realesrgan_models", api.get_realesrgan_models(), ["name", "path", "scale"])
list_of("get_prompt_styles", api.get_prompt_styles(), ["name", "prompt", "negative_prompt"])
loras = list_of("get_loras", api.get_loras(), ["name", "alias", "path", "metadata"])
check("get_loras", [l["name"] for l in loras] == ["style"], loras)
check("get_loras metadata", loras[0]["metadata"].get("ss_network_dim") == "4", loras)
emb = api.get_embeddings()
check("get_embeddings", set(emb) == {"loaded", "skipped"}, emb)
check("get_embeddings shape", emb["loaded"]["tok"]["vectors"] == 2 and emb["loaded"]["tok"]["shape"] == 32, emb)
scripts = api.get_scripts()
check("get_scripts", scripts == {"txt2img": [], "img2img": []}, scripts)
mem = api.get_memory()
check("get_memory", mem["ram"]["total"] > 0 and mem["ram"]["process"] > 0 and "cuda" in mem, mem)
check("get_cmd_flags", api.get_cmd_flags()["api"] is True)
check("refresh_checkpoints", api.refresh_checkpoints() is None)
names = api.util_get_model_names()
check("util_get_model_names", len(names) == 1 and names[0].startswith("tiny ["), names)
check("util_get_sampler_names", "Euler a" in api.util_get_sampler_names())
check("util_get_scheduler_names", api.util_get_scheduler_names() == ["automatic", "karras"])
api.util_set_model("tiny")
check("util_set_model/get_current_model", api.util_get_current_model() == "tiny")
opts = api.get_options()
check("get_options", opts["sd_model_checkpoint"] == "tiny", opts)
check("set_options", api.set_options({"CLIP_stop_at_last_layers": 1}) is None)
progress = api.get_progress()
check("get_progress", {"progress", "eta_relative", "state", "current_image", "textinfo"} <= set(progress), progress)
api.util_wait_for_ready(check_interval=0.2)
checked.append("util_wait_for_ready")

# Generation, with webuiapi's full default payloads.
r = api.txt2img(prompt="a red circle", seed=5, width=32, height=32, sampler_name="Euler a", cfg_scale=5)
check("txt2img", len(r.images) == 1 and r.image.size == (32, 32), r.info)
check("txt2img info", r.info["seed"] == 5 and r.info["steps"] == 3, r.info)

# png-info reads the infotext webuiapi keeps on the image.
p = api.png_info(r.image)
check("png_info", p.parameters["Steps"] == "3" and p.parameters["Seed"] == "5", p.parameters)
check("png_info prompt", p.parameters["Prompt"] == "a red circle", p.parameters)
check("png_info info", "Steps: 3" in (p.info if isinstance(p.info, str) else ""), p.info)

r2 = api.img2img(images=[r.image], prompt="a blue circle", seed=6, width=32, height=32, denoising_strength=0.5)
check("img2img", r2.image.size == (32, 32), r2.info)

# Resize modes: a 64 x 32 init image to 32 x 32 by cropping, by filling and by resizing its
# latents (3); each its own image, 4 refused.
wide = r.image.convert("RGB").resize((64, 32))
made = {}
for mode in (0, 1, 2, 3):
    rm = api.img2img(images=[wide], prompt="x", width=32, height=32, seed=6, resize_mode=mode, denoising_strength=0.5)
    check(f"resize_mode {mode}", rm.image.size == (32, 32), rm.image.size)
    made[mode] = rm.image.tobytes()
check("resize modes differ", len(set(made.values())) == 4, "two modes made the same image")
try:
    api.img2img(images=[wide], prompt="x", width=32, height=32, resize_mode=4)
    check("resize_mode 4 refused", False, "accepted")
except RuntimeError as e:
    check("resize_mode 4 refused", e.args[0] == 422 and "resize_mode" in e.args[1], e.args)

mask = Image.new("L", (32, 32), 0)
mask.paste(255, (8, 8, 24, 24))
# webuiapi's defaults: masked content "fill", only the masked area.
r3 = api.img2img(images=[r.image], mask_image=mask, prompt="x", width=32, height=32, seed=7)
check("inpaint (webuiapi defaults)", r3.image.size == (32, 32), r3.info)
for fill in (1, 2, 3):
    rf = api.img2img(images=[r.image], mask_image=mask, prompt="x", width=32, height=32,
                     inpainting_fill=fill, inpaint_full_res=False, seed=7)
    check(f"inpaint fill {fill}", rf.image.size == (32, 32), rf.info)
try:
    api.img2img(images=[r.image], mask_image=mask, prompt="x", width=32, height=32, inpainting_fill=7)
    check("inpainting_fill 7 refused", False, "accepted")
except RuntimeError as e:
    check("inpainting_fill 7 refused", e.args[0] == 422 and "inpainting_fill" in e.args[1], e.args)

# Only masked: a 64 x 64 image, its corner's mask generated at 32 x 32 and pasted back; the
# answer has the image's size and every pixel away from the mask is the image's own.
big = r.image.convert("RGB").resize((64, 64))
corner = Image.new("L", (64, 64), 0)
corner.paste(255, (44, 44, 60, 60))
ro = api.img2img(images=[big], mask_image=corner, prompt="x", width=32, height=32, seed=8,
                 mask_blur=0, inpainting_fill=1, inpaint_full_res=True, inpaint_full_res_padding=2)
check("only masked keeps the image's size", ro.image.size == (64, 64), ro.image.size)
out = ro.image.convert("RGB")
same = all(out.getpixel((x, y)) == big.getpixel((x, y)) for x in range(0, 40) for y in range(0, 64))
check("only masked keeps the rest", same)
changed = sum(out.getpixel((x, y)) != big.getpixel((x, y)) for x in range(44, 60) for y in range(44, 60))
check("only masked repaints the mask", changed > 100, changed)

# Hires fix: 32 x 32 then 64 x 64, in latent space and as pixels.
for upscaler in ("Latent", "Lanczos"):
    h = api.txt2img(prompt="a red circle", seed=5, width=32, height=32, enable_hr=True, hr_scale=2,
                    hr_upscaler=upscaler, hr_second_pass_steps=2, denoising_strength=0.5)
    check(f"hires {upscaler}", h.image.size == (64, 64), h.image.size)
    hp = api.png_info(h.image).parameters
    check(f"hires {upscaler} infotext", hp.get("Hires upscale") == "2" and hp.get("Hires upscaler") == upscaler
          and hp.get("Size-1") == "32" and hp.get("Denoising strength") == "0.5", hp)
try:
    api.txt2img(prompt="x", enable_hr=True, hr_upscaler="R-ESRGAN 4x+", width=32, height=32)
    check("unknown hires upscaler refused", False, "accepted")
except RuntimeError as e:
    check("unknown hires upscaler refused", e.args[0] == 422 and "hr_upscaler" in e.args[1], e.args)

check("interrupt (idle)", api.interrupt() == {})

# A long request: progress reports its steps, ETA and live preview; interrupt ends it early with
# the image as far as it got.
import threading
import time

check("set_options previews", api.set_options({"show_progress_every_n_steps": 1}) is None)
done = []


def slow():
    try:
        done.append(api.txt2img(prompt="a slow circle", steps=150, width=64, height=64, seed=9))
    except Exception as e:  # the main thread reports it
        done.append(e)


t = threading.Thread(target=slow)
t.start()
deadline = time.time() + 30
seen = None
while time.time() < deadline and not done:
    p = api.get_progress()
    st = p["state"]
    if st["sampling_step"] >= 3 and p["current_image"]:
        seen = p
        break
    time.sleep(0.05)
check("progress while running", seen is not None, f"no step or preview seen before the request ended: {done} last {dict(p, current_image=bool(p['current_image']))}")
check("progress steps", 0 < seen["state"]["sampling_step"] < seen["state"]["sampling_steps"], seen["state"])
check("progress eta", seen["eta_relative"] > 0 and 0 < seen["progress"] < 1, seen)
check("progress preview", Image.open(__import__("io").BytesIO(__import__("base64").b64decode(seen["current_image"]))).size == (64, 64))
check("interrupt", api.interrupt() == {})
t.join(timeout=120)
check("interrupted request answered", len(done) == 1, "the request did not return")
check("interrupted image", not isinstance(done[0], Exception) and len(done[0].images) == 1
      and done[0].image.size == (64, 64), done[0])
check("skip (idle)", api.skip() is None)
api.set_options({"show_progress_every_n_steps": 0})
# Extras: A1111's built-in upscalers on the augmenter.
src = Image.new("RGB", (40, 24))
for x in range(40):
    for y in range(24):
        src.putpixel((x, y), (x * 6, y * 10, (x + y) * 4))
r = api.extra_single_image(image=src, upscaler_1="Lanczos", upscaling_resize=2)
check("extra_single_image", r.image.size == (80, 48), r.image.size)
check("extra_single_image info", "Postprocess upscaler: Lanczos" in r.info and r.info.startswith("<p>"), r.info)
r = api.extra_single_image(image=src, upscaler_1="Nearest", upscaling_resize=2)
check("extra_single_image nearest", r.image.convert("RGB").getpixel((13, 9)) == src.getpixel((6, 4)), r.image.getpixel((13, 9)))
r = api.extra_single_image(image=src, resize_mode=1, upscaler_1="Nearest", upscaling_resize_w=64, upscaling_resize_h=64)
check("extra_single_image to size, cropped", r.image.size == (64, 64), r.image.size)
r = api.extra_batch_images(images=[src, src.transpose(Image.FLIP_LEFT_RIGHT)], upscaler_1="Lanczos", upscaling_resize=1.5)
check("extra_batch_images", [i.size for i in r.images] == [(56, 32), (56, 32)], [i.size for i in r.images])
for bad, field in [(dict(upscaler_1="ESRGAN_4x"), "upscaler"), (dict(upscaler_1="Lanczos", gfpgan_visibility=0.5), "gfpgan_visibility")]:
    try:
        api.extra_single_image(image=src, **bad)
        check(f"extras refuses {field}", False, "accepted")
    except RuntimeError as e:
        check(f"extras refuses {field}", e.args[0] == 422 and field in e.args[1], e.args)

# An upscaler model from <models>/ESRGAN (a tiny random 4x RRDBNet) runs on the sampler.
names = [u["name"] for u in api.get_upscalers()]
check("upscaler models listed", "tiny-4x" in names, names)
r = api.extra_single_image(image=src, upscaler_1="tiny-4x", upscaling_resize=2)
check("extras with a model", r.image.size == (80, 48) and "Postprocess upscaler: tiny-4x" in r.info, (r.image.size, r.info))
r4 = api.extra_single_image(image=src, upscaler_1="tiny-4x", upscaling_resize=4)
l4 = api.extra_single_image(image=src, upscaler_1="Lanczos", upscaling_resize=4)
check("the model's own pixels", r4.image.size == (160, 96) and r4.image.tobytes() != l4.image.tobytes(), r4.image.size)
r = api.extra_single_image(image=src, upscaler_1="Lanczos", upscaler_2="tiny-4x", extras_upscaler_2_visibility=0.5, upscaling_resize=4)
check("a model blended in as upscaler 2", r.image.size == (160, 96) and r.image.tobytes() not in (r4.image.tobytes(), l4.image.tobytes())
      and "Postprocess upscaler 2: tiny-4x" in r.info, r.info)

# Interrogate: the captioner's BLIP caption (the tiny model's words are noise, but its own).
r = api.interrogate(image=src, model="clip")
check("interrogate", isinstance(r.info, str) and r.info == r.json["caption"], r.json)
check("interrogate is the model's caption", api.interrogate(image=src, model="blip/tiny-blip").info == r.info)
try:
    api.interrogate(image=src, model="deepdanbooru")
    check("interrogate deepdanbooru refused", False, "accepted")
except RuntimeError as e:
    check("interrogate deepdanbooru refused", e.args[0] == 422 and "clip (BLIP tiny-blip)" in e.args[1], e.args)

# sd_vae: the separate VAE decodes instead of the model's own, and the infotext names it.
plain = api.txt2img(prompt="a vae test", steps=3, width=32, height=32, seed=21)
api.set_options({"sd_vae": "warm.safetensors"})
check("sd_vae option", api.get_options()["sd_vae"] == "warm.safetensors")
warm = api.txt2img(prompt="a vae test", steps=3, width=32, height=32, seed=21)
check("sd_vae changes the image", warm.image.tobytes() != plain.image.tobytes())
check("sd_vae infotext", "VAE: warm.safetensors" in warm.info["infotexts"][0] and "VAE hash: " in warm.info["infotexts"][0], warm.info["infotexts"][0])
over = api.txt2img(prompt="a vae test", steps=3, width=32, height=32, seed=21, override_settings={"sd_vae": "Automatic"})
check("sd_vae override back to the model's", over.image.tobytes() == plain.image.tobytes())
api.set_options({"sd_vae": "Automatic"})
refused = api.set_options({"sd_vae": "missing.safetensors"})  # webuiapi returns the body
check("unknown sd_vae refused", refused["error"]["code"] == "unknown_vae" and "warm.safetensors" in refused["error"]["message"], refused)
check("a refused option changes nothing", api.get_options()["sd_vae"] == "Automatic")

names = list(dict.fromkeys(checked))
print("webuiapi: checked", len(names), ":", ", ".join(names))
