"""A/B of the graph engines on one archive's ONNX graph, in one process, calls alternating.

    .venv-serve/bin/python benchmarks/bench_graph_engines.py UNPACKED_ARCHIVE/features.onnx --reps 30

ONNX Runtime fp32, OpenVINO fp32 and OpenVINO bf16, configured as handlers/runtime.py configures
them (2 threads by default, no spinning, one stream); a 20 ms pause before every call lets the
previous engine's threads go idle. Prints ms per image (min, 25th percentile, median) at batch 1 and 8.
"""

import argparse
import time

import numpy as np
import openvino as ov
import onnxruntime as ort


def main(args: argparse.Namespace) -> None:
    core = ov.Core()
    print("OpenVINO CPU capabilities:", core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    requests = {
        precision: core.compile_model(str(args.graph), "CPU", {
            "INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}).create_infer_request()
        for precision in ("f32", "bf16")
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(args.graph), options, providers=["CPUExecutionProvider"])
    runs = {"onnxruntime fp32": lambda x: session.run(None, {session.get_inputs()[0].name: x}),
            "openvino fp32": lambda x: requests["f32"].infer({0: x}),
            "openvino bf16": lambda x: requests["bf16"].infer({0: x})}
    for batch in (1, 8):
        images = np.random.default_rng(0).random((batch, 3, 224, 224), dtype=np.float32)
        times = {name: [] for name in runs}
        for run in runs.values():
            run(images)
            run(images)
        for _ in range(args.reps):
            for name, run in runs.items():
                time.sleep(0.02)
                start = time.perf_counter()
                run(images)
                times[name].append((time.perf_counter() - start) / batch * 1e3)
        for name, values in times.items():
            print(f"batch {batch} {name}: min {min(values):.1f}, p25 {np.percentile(values, 25):.1f}, "
                  f"median {np.median(values):.1f} ms/image")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graph", type=str, help="an unpacked archive's features.onnx")
    parser.add_argument("--reps", type=int, default=30, help="alternating rounds per batch size")
    parser.add_argument("--threads", type=int, default=2, help="threads per engine (the worker's)")
    main(parser.parse_args())
