"""Reference outputs for the ESRGAN loader: random RRDBNets written with torch.save in both key
layouts (BasicSR's, wrapped in params_ema as Real-ESRGAN ships them, and the original ESRGAN's
model.N names), run on a test pattern the way AUTOMATIC1111 feeds such models (BGR, /255, clamp,
truncate to bytes). Usage: esrgan_reference.py OUT_DIR W H."""
import struct
import sys

import torch
import torch.nn.functional as F

out, W, H = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


def make(g, nf, gc, nb, in_ch, n_up):
    p = {}

    def add(name, cin, cout):
        p[name + ".weight"] = torch.randn(cout, cin, 3, 3, generator=g) * 0.05
        p[name + ".bias"] = torch.randn(cout, generator=g) * 0.05

    add("conv_first", in_ch, nf)
    for i in range(nb):
        for k in (1, 2, 3):
            for j in range(1, 6):
                add(f"body.{i}.rdb{k}.conv{j}", nf + (j - 1) * gc, gc if j < 5 else nf)
    add("conv_body", nf, nf)
    for u in range(1, n_up + 1):
        add(f"conv_up{u}", nf, nf)
    add("conv_hr", nf, nf)
    add("conv_last", nf, 3)
    # Centre the output in [0, 1] and spread it, so clamping leaves most of it alone.
    p["conv_last.weight"] *= 8.0
    p["conv_last.bias"] += 0.5
    return p


def conv(p, name, x):
    return F.conv2d(x, p[name + ".weight"], p[name + ".bias"], padding=1)


def forward(p, nb, n_up, unshuffle, x):
    if unshuffle > 1:
        x = F.pixel_unshuffle(x, unshuffle)
    feat = conv(p, "conv_first", x)
    h = feat
    for i in range(nb):
        block_in = h
        for k in (1, 2, 3):
            feats = [h]
            for j in range(1, 5):
                feats.append(F.leaky_relu(conv(p, f"body.{i}.rdb{k}.conv{j}", torch.cat(feats, 1)), 0.2))
            h = conv(p, f"body.{i}.rdb{k}.conv5", torch.cat(feats, 1)) * 0.2 + h
        h = h * 0.2 + block_in
    feat = feat + conv(p, "conv_body", h)
    for u in range(1, n_up + 1):
        feat = F.leaky_relu(conv(p, f"conv_up{u}", F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
    return conv(p, "conv_last", F.leaky_relu(conv(p, "conv_hr", feat), 0.2))


def old_names(p, nb):
    """BasicSR names → the original ESRGAN's (for a 4x model: ups at 3 and 6, HR 8, last 10)."""
    fixed = {"conv_first": "model.0", f"conv_body": f"model.1.sub.{nb}", "conv_up1": "model.3",
             "conv_up2": "model.6", "conv_hr": "model.8", "conv_last": "model.10"}
    q = {}
    for k, v in p.items():
        stem, leaf = k.rsplit(".", 1)
        if stem.startswith("body."):
            _, i, rdb, c = stem.split(".")
            stem = f"model.1.sub.{i}.RDB{rdb[3:]}.{c}.0"
        else:
            stem = fixed[stem]
        q[f"{stem}.{leaf}"] = v
    return q


pixels = [((x * 37 + y * 11) % 256, (x * 5 + y * 29) % 256, (x * y * 3) % 256) for y in range(H) for x in range(W)]
rgb = torch.tensor(pixels, dtype=torch.uint8).view(H, W, 3)


def a1111(p, nb, n_up, unshuffle, name):
    x = rgb.flip(2).permute(2, 0, 1).double().div(255).float().unsqueeze(0)
    with torch.no_grad():
        y = forward(p, nb, n_up, unshuffle, x)
    # The unclamped output as little-endian f32, for a comparison before rounding.
    flat = y.contiguous().view(-1).tolist()
    open(f"{out}/{name}.f32", "wb").write(struct.pack(f"<{len(flat)}f", *flat))
    y = (y.squeeze(0).clamp(0, 1) * 255.0).permute(1, 2, 0).to(torch.uint8).flip(2)
    return bytes(y.contiguous().view(-1).tolist())


g = torch.Generator().manual_seed(7)
x4 = make(g, 8, 4, 2, 3, 2)
torch.save({"params_ema": x4}, f"{out}/x4_basicsr.pth")
torch.save(old_names(x4, 2), f"{out}/x4_esrgan.pth")
open(f"{out}/x4.rgb", "wb").write(a1111(x4, 2, 2, 1, "x4"))
x2 = make(g, 8, 4, 1, 12, 2)
torch.save(x2, f"{out}/x2_unshuffle.pth")
open(f"{out}/x2.rgb", "wb").write(a1111(x2, 1, 2, 2, "x2"))
