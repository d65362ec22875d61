"""int8 experiment (measured, not shipped): ONNX Runtime static quantisation (QDQ, per-channel
weights, calibrated on 64 clothing10 training photos) of efficientnet_lite0's exported graph;
ImageNet Top-1 on imagenet-sample500 and ms per image against fp32 / bf16, 2 threads.

    .venv/bin/python -m benchmarks.bench_int8

Writes /tmp/rt/int8/features.onnx and /tmp/rt/int8.json; uses the export cache at /tmp/rt/onnxcache.
"""
import csv, sys, time, json, numpy as np, torch
from pathlib import Path
from onnxruntime.quantization import quantize_static, CalibrationDataReader, QuantType, QuantFormat
from handlers.backbones import get_backbone
from imagerec.export import exported_graph_dir
from imagerec.precision_guard import eval_images, read_labelled_photos
from handlers.runtime import PortableFeatures
torch.set_num_threads(2)
b = get_backbone("efficientnet_lite0"); w = b.resolve_weights()
g = exported_graph_dir(b.name, w, "/tmp/rt/onnxcache")
calib_paths = sorted(Path("/work/shared/datasets/clothing10/train").glob("*/*"))[::8][:64]
calib = eval_images(calib_paths, b.name).numpy()
class Reader(CalibrationDataReader):
    def __init__(self): self.i = 0
    def get_next(self):
        if self.i >= len(calib): return None
        x = calib[self.i:self.i+8]; self.i += 8
        return {"images": x}
t = time.time()
out = "/tmp/rt/int8/features.onnx"; Path(out).parent.mkdir(exist_ok=True)
quantize_static(str(g / "features.onnx"), out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
print("quantise s", time.time() - t, Path(out).stat().st_size)
photos = read_labelled_photos(Path("/work/shared/datasets/imagenet-sample500"))
images = eval_images([p for p, _ in photos], b.name); labels = torch.tensor([l for _, l in photos])
cls = b.load(w).classifier
res = {}
for name, graph, engine, prec in [("fp32 ov", g / "features.onnx", "openvino", "fp32"), ("bf16 ov", g / "features.onnx", "openvino", "bf16"),
                                  ("int8 ort", Path(out), "onnxruntime", "fp32"), ("int8 ov", Path(out), "openvino", "fp32")]:
    f = PortableFeatures(graph, engine, prec, 2)
    with torch.inference_mode():
        feats = torch.cat([f(c) for c in images.split(16)])
        top1 = (cls(feats).argmax(1) == labels).float().mean().item()
        x8 = images[:8]; f(x8)
        ts = []
        for _ in range(5):
            s = time.perf_counter(); f(x8); ts.append((time.perf_counter() - s) / 8 * 1e3)
        x1 = images[:1]; ts1 = []
        for _ in range(10):
            s = time.perf_counter(); f(x1); ts1.append((time.perf_counter() - s) * 1e3)
    res[name] = {"top1": top1, "ms_b8": float(np.median(ts)), "ms_b1": float(np.median(ts1))}
    print(name, res[name], flush=True)
json.dump(res, open("/tmp/rt/int8.json", "w"), indent=1)
