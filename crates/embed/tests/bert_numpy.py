"""An independent NumPy forward pass of a sentence-transformers BERT folder (mean pooling, L2
normalisation), reading model.safetensors directly. Input on stdin: {"dir", "ids": [[...]],
"mask": [[...]]}; output: the embeddings as JSON. The Rust test compares against it."""
import json
import math
import struct
import sys

import numpy as np


def load(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    types = {"F32": np.float32, "I64": np.int64}
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        s, e = v["data_offsets"]
        out[k] = np.frombuffer(data[s:e], dtype=types[v["dtype"]]).reshape(v["shape"])
    return out


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


erf = np.vectorize(math.erf)


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


req = json.load(sys.stdin)
cfg = json.load(open(req["dir"] + "/config.json"))
W = load(req["dir"] + "/model.safetensors")
eps = cfg["layer_norm_eps"]
heads = cfg["num_attention_heads"]
out = []
for ids, mask in zip(req["ids"], req["mask"]):
    ids = np.array(ids)
    mask = np.array(mask, dtype=np.float64)
    n = len(ids)
    x = (W["embeddings.word_embeddings.weight"][ids]
         + W["embeddings.position_embeddings.weight"][:n]
         + W["embeddings.token_type_embeddings.weight"][0]).astype(np.float64)
    x = layer_norm(x, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"], eps)
    bias = (1.0 - mask)[None, None, :] * -1e30
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        lin = lambda h, name: h @ W[p + name + ".weight"].T + W[p + name + ".bias"]
        q, k, v = (lin(x, "attention.self." + t) for t in ("query", "key", "value"))
        d = q.shape[-1] // heads
        split = lambda t: t.reshape(n, heads, d).transpose(1, 0, 2)
        q, k, v = split(q), split(k), split(v)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(d) + bias
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(n, heads * d)
        x = layer_norm(lin(a, "attention.output.dense") + x,
                       W[p + "attention.output.LayerNorm.weight"], W[p + "attention.output.LayerNorm.bias"], eps)
        h = gelu(lin(x, "intermediate.dense"))
        x = layer_norm(lin(h, "output.dense") + x,
                       W[p + "output.LayerNorm.weight"], W[p + "output.LayerNorm.bias"], eps)
    pooled = (x * mask[:, None]).sum(0) / max(mask.sum(), 1e-9)
    out.append((pooled / np.linalg.norm(pooled)).tolist())
print(json.dumps(out))
