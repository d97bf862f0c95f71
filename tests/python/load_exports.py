"""Loads atelier's dataset exports with Hugging Face `datasets` and prints what it saw as JSON.

Usage: load_exports.py FORMAT DIR   (FORMAT: jsonl | webdataset | llava | parquet | card)

`card` opens the folder as the Hub would, from its README.md `configs` (any format).
"""
import glob
import json
import os
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402

fmt, root = sys.argv[1], sys.argv[2]
splits = [s for s in ("train", "validation", "test")]
out = {}
if fmt == "jsonl":
    ds = datasets.load_dataset("imagefolder", data_dir=root)
    for name, d in ds.items():
        first = d[0]
        out[name] = {
            "rows": d.num_rows,
            "columns": sorted(d.column_names),
            "size": list(first["image"].size),
            "texts": sorted(d["text"]),
        }
elif fmt == "webdataset":
    files = {s: os.path.join(root, s, "*.tar") for s in splits if os.path.isdir(os.path.join(root, s))}
    ds = datasets.load_dataset("webdataset", data_files=files)
    for name, d in ds.items():
        first = d[0]
        img = first.get("png") or first.get("jpg")
        out[name] = {
            "rows": d.num_rows,
            "columns": sorted(d.column_names),
            "size": list(img.size),
            "texts": sorted(d["txt"]),
            "keys_match": all(r["__key__"] == r["json"]["key"] for r in d),
        }
elif fmt == "llava":
    files = {s: sorted(glob.glob(os.path.join(root, s + "-*.json"))) for s in splits}
    ds = datasets.load_dataset("json", data_files={s: f for s, f in files.items() if f})
    for name, d in ds.items():
        texts = []
        ok = True
        for r in d:
            conv = r["conversations"]
            ok = ok and conv[0]["from"] == "human" and conv[0]["value"].startswith("<image>\n")
            ok = ok and conv[1]["from"] == "gpt" and os.path.exists(os.path.join(root, r["image"]))
            texts.append(conv[1]["value"])
        out[name] = {"rows": d.num_rows, "columns": sorted(d.column_names), "texts": sorted(texts), "well_formed": ok}
elif fmt == "parquet":
    # The directory as a Hub-style dataset: splits from data/<split>-NNNNN-of-NNNNN.parquet.
    ds = datasets.load_dataset(root)
    for name, d in ds.items():
        first = d[0]
        out[name] = {
            "rows": d.num_rows,
            "columns": sorted(d.column_names),
            "size": list(first["image"].size),
            "image_feature": type(d.features["image"]).__name__,
            "texts": sorted(d["text"]),
        }
elif fmt == "card":
    ds = datasets.load_dataset(root)
    for name, d in ds.items():
        first = d[0]
        images = [k for k, f in d.features.items() if isinstance(f, datasets.Image)]
        out[name] = {
            "rows": d.num_rows,
            "columns": sorted(d.column_names),
            # Every sample has its image (a WebDataset shard mixing keys loses some).
            "with_image": sum(1 for r in d if any(r.get(k) is not None for k in images)) if images else None,
            "size": list(first[images[0]].size) if images else None,
        }
else:
    sys.exit(f"unknown format {fmt}")
print(json.dumps(out))
