"""Runs an ONNX model with onnxruntime's Python API on a raw little-endian f32 input and writes the
first output the same way. Usage: ort_reference.py MODEL INPUT.f32 N C H W OUTPUT.f32"""
import sys

import numpy as np
import onnxruntime

model, inp, n, c, h, w, out = sys.argv[1:8]
x = np.fromfile(inp, dtype="<f4").reshape(int(n), int(c), int(h), int(w))
session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
y = session.run(None, {session.get_inputs()[0].name: x})[0]
y.astype("<f4").tofile(out)
print(" ".join(str(d) for d in y.shape))
