"""CLIP image and text embeddings on PyTorch (transformers' CLIPModel), to compare with
atelier-embed-bench on the same folder.

    python clip_torch.py --make DIR --tokenizer TOKDIR   # random ViT-L/14 weights into DIR
    python clip_torch.py --dir DIR --item clip_image --batch 16 --runs 3

Prints one JSON line: the median of --runs timed calls after one warm-up, and the process's peak
resident memory.
"""
import argparse, json, os, resource, shutil, statistics, time

import torch
from transformers import CLIPConfig, CLIPModel


def make(out, tokenizer):
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, image_size=224, patch_size=14),
        projection_dim=768,
    )
    CLIPModel(cfg).save_pretrained(out, safe_serialization=True)
    for f in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        if os.path.exists(os.path.join(tokenizer, f)):
            shutil.copy(os.path.join(tokenizer, f), out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--make")
    p.add_argument("--tokenizer")
    p.add_argument("--dir")
    p.add_argument("--item", default="clip_image")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    if a.make:
        make(a.make, a.tokenizer)
        return
    torch.set_num_threads(int(os.environ.get("ATELIER_BENCH_THREADS", os.cpu_count() or 1)))
    model = CLIPModel.from_pretrained(a.dir).eval()
    if a.item == "clip_image":
        x = torch.randn(a.batch, 3, 224, 224)
        run = lambda: model.get_image_features(pixel_values=x)
    else:
        ids = torch.randint(1, 49000, (a.batch, 77))
        run = lambda: model.get_text_features(input_ids=ids)
    times = []
    with torch.inference_mode():
        run()
        for _ in range(a.runs):
            s = time.perf_counter()
            run()
            times.append((time.perf_counter() - s) * 1000)
    print(json.dumps({"bench": a.item, "engine": "pytorch-python", "batch": a.batch,
                      "median_ms": round(statistics.median(times), 1), "runs": a.runs,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
