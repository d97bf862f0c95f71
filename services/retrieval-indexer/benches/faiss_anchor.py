"""faiss IndexHNSWFlat on the vectors atelier-ann-bench wrote: the same M, efConstruction and
efSearch, recall@k against the bench's exact neighbours, queries/s with 1 and 2 OpenMP threads
(one batched search call per pass; the median pass of at least five and one second). Prints one JSON line per efSearch.

With --segment N the index grows as atelier-ann-bench --scale grows ours: N vectors at a time,
each step reading the previous index file back (faiss.read_index), adding, writing it again
(faiss.write_index); one more line gives the build time, the peak and resident memory above
what the process held before building (the base vectors) and the index file's size."""
import argparse
import json
import os
import sys
import time

import faiss
import numpy as np

p = argparse.ArgumentParser()
p.add_argument("--dataset", required=True)
p.add_argument("--dim", type=int, required=True)
p.add_argument("--m", type=int, required=True)
p.add_argument("--ef-construction", type=int, required=True)
p.add_argument("--ef-search", required=True)
p.add_argument("--k", type=int, default=10)
p.add_argument("--segment", type=int)
p.add_argument("--work-dir", default=".")
p.add_argument("base")
p.add_argument("queries")
p.add_argument("truth")
a = p.parse_args()

base = np.fromfile(a.base, dtype="<f4").reshape(-1, a.dim)
queries = np.fromfile(a.queries, dtype="<f4").reshape(-1, a.dim)
truth = np.fromfile(a.truth, dtype="<i8").reshape(-1, a.k)



def proc_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def new_index():
    index = faiss.IndexHNSWFlat(a.dim, a.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = a.ef_construction
    return index


def grown_in_segments():
    path = os.path.join(a.work_dir, "faiss.index")
    baseline = proc_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start, index = time.perf_counter(), None
    for s, first in enumerate(range(0, len(base), a.segment)):
        t = time.perf_counter()
        if index is not None:
            del index
            index = faiss.read_index(path)
            index.hnsw.efConstruction = a.ef_construction
        else:
            index = new_index()
        index.add(base[first:first + a.segment])
        faiss.write_index(index, path)
        print(f"faiss: segment {s} ({index.ntotal} in all) in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    build = time.perf_counter() - start
    print(json.dumps({
        "dataset": a.dataset, "library": f"faiss-cpu {faiss.__version__} IndexHNSWFlat",
        "n": len(base), "dim": a.dim, "segment": a.segment, "build_s": build,
        "peak_mib_above_base": (proc_bytes("VmHWM") - baseline) >> 20,
        "resident_mib_above_base": (proc_bytes("VmRSS") - baseline) >> 20,
        "graph_mib_in_store": os.path.getsize(path) >> 20,
    }), flush=True)
    return index, build


faiss.omp_set_num_threads(2)
if a.segment:
    index, build = grown_in_segments()
else:
    index = new_index()
    t = time.perf_counter()
    index.add(base)
    build = time.perf_counter() - t

for ef in [int(x) for x in a.ef_search.split(",")]:
    index.hnsw.efSearch = ef
    out = {}
    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)
        # At least five passes and one second; the median pass, as atelier-ann-bench measures.
        rates, start = [], time.perf_counter()
        while len(rates) < 5 or time.perf_counter() - start < 1.0:
            t = time.perf_counter()
            _, found = index.search(queries, a.k)
            rates.append(len(queries) / (time.perf_counter() - t))
        out[threads] = (sorted(rates)[len(rates) // 2], found)
    found = out[1][1]
    rec = np.mean([len(set(f[f >= 0]) & set(g[g >= 0])) / max(1, (g >= 0).sum()) for f, g in zip(found, truth)])
    print(json.dumps({
        "dataset": a.dataset, "library": f"faiss-cpu {faiss.__version__} IndexHNSWFlat",
        "n": len(base), "dim": a.dim, "queries": len(queries), "m": a.m,
        "ef_construction": a.ef_construction, "ef_search": ef, "build_s": build,
        "recall_at_10": float(rec), "qps_1_thread": out[1][0], "qps_2_threads": out[2][0],
    }), flush=True)
