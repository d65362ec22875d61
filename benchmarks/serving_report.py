"""The report of benchmarks/bench_serving.py: markdown tables from the measured figures.

Figures only: what the figures led to, in words, is in docs/BENCHMARKS.md ("Serving: what was
changed, and why"), beside the generated section.
"""

from __future__ import annotations

import sys

from benchmarks.bench_in_worker import GUARD_MAX_PROB_CHANGE, GUARD_MIN_TOP1, REFERENCE_VARIANT, VARIANTS
from benchmarks.report import machine_description
from benchmarks.serving_offline import HEAD_SETS, HEAD_SHOTS, resnet18_variant_model

SECTION = "## Serving speed"
MEMORY_TARGET_MB = 1536
TARGET_THROUGHPUT_RATIO = 2.5
TARGET_LATENCY_RATIO = 0.7
# Longer than the handler's IDLE_TRIM_S (it returns a batch's freed memory to the OS after that
# idle time); not imported from there because importing the handler module would import torch.
MEMORY_SETTLE_S = 4.0


def fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ceiling(costs: dict, forward: dict, threads: int) -> tuple[float, float]:
    """(images/s, single-request ms) one worker can reach: preprocessing spread over its threads, then
    the forward pass; nothing for HTTP, the frontend or the load generator."""
    per_image_ms = costs["preprocess_ms"] / threads + forward["forward_batch_ms_per_image"]
    return 1e3 / per_image_ms, costs["preprocess_ms"] + forward["forward1_ms"]




def build_report(args, offline: dict, served: list[dict], started: str, loads: list[str]) -> str:
    """The "## Serving speed" section: every table of one run, in reading order."""
    # Ratios against the faster of the two references (taken before and after the served runs): the
    # stricter comparison, and robust to other jobs slowing one of them down.
    start, end = offline["reference"], offline.get("reference_end", offline["reference"])
    reference = {"batch1_latency_ms": min(start["batch1_latency_ms"], end["batch1_latency_ms"]),
                 "batch16_throughput": max(start["batch16_throughput"], end["batch16_throughput"])}
    runs = {(r["model"], r["clients"]): r for part in served for r in part["runs"]}
    top = max(args.levels)
    lines = header_lines(offline, started, loads)
    lines += reference_lines(start, end, reference)
    lines += served_lines(offline, served)
    lines += ratio_lines(offline, runs, reference, top)
    lines += lever_lines(offline["archives"], runs, offline, offline["costs"], top)
    lines += memory_lines(served)
    lines += guard_lines(offline["worker"]["guard"], offline)
    lines += ceiling_lines(offline, runs, top)
    return "\n".join(lines)


def header_lines(offline: dict, started: str, loads: list[str]) -> list[str]:
    return [
        SECTION, "",
        f"Command: `{' '.join(['.venv/bin/python', '-m', 'benchmarks.bench_serving', *sys.argv[1:]])}`  ",
        f"Machine: {machine_description()}. Started {started}.  ",
        f"Load average (1 min) before / during / after: {' / '.join(loads)} (other engineers' jobs share "
        f"these cores; the 'others' column is CPU used by processes outside this benchmark).  ",
        f"Served archives: **{offline['variant']}** ({VARIANT_WORDS[offline['variant']]}), "
        f"batch size {offline['batching']['batch_size']}, "
        f"max batch delay {offline['batching']['max_batch_delay_ms']} ms, 1 worker with {offline['threads']} torch "
        f"threads. Photos: {offline['photos']} real val images of ../shared/datasets, sent as-is (PUT raw bytes).",
    ]


def reference_lines(start: dict, end: dict, reference: dict) -> list[str]:
    return [
        "", "### Reference (in-process, fp32 eager resnet18, same run)", "",
        "| measure | before the served runs | after | used for the ratios (the faster) |", "|---|---|---|---|",
        f"| batch-1 latency: decode + preprocess a real photo + forward | {start['batch1_latency_ms']:.1f} ms | "
        f"{end['batch1_latency_ms']:.1f} ms | {reference['batch1_latency_ms']:.1f} ms |",
        f"| batch-16 throughput: forward only, 224x224 | {start['batch16_throughput']:.1f} img/s | "
        f"{end['batch16_throughput']:.1f} img/s | {reference['batch16_throughput']:.1f} img/s |",
    ]


def served_lines(offline: dict, served: list[dict]) -> list[str]:
    archives, threads = offline["archives"], offline["threads"]
    lines = ["", "### Served (TorchServe over HTTP)", "",
             "| model | variant | batch / delay / workers | clients | img/s | p50 ms | p95 ms | p99 ms | errors "
             "| CPU cores: workers / frontend / load gen / others |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for part in served:
        for r in part["runs"]:
            a = archives[r["model"]]
            b = a["batching"]
            cpu = r["cpu_cores"]
            workers = sum(v for k, v in cpu.items() if k.startswith("worker"))
            frontend = cpu.get("frontend", 0.0) + cpu.get("launcher", 0.0)
            lines.append(
                f"| {r['model']} | {a['variant']} | {b['batch_size']} / {b['max_batch_delay_ms']} ms / "
                f"{b['workers']}x{b['torch_threads'] or threads // b['workers']}t | {r['clients']} | "
                f"{r['throughput']:.1f} | {fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | {fmt(r['p99_ms'])} | "
                f"{r['errors']} | {workers:.2f} / {frontend:.2f} / {cpu.get('load generator', 0.0):.2f} / "
                f"{r['cpu_cores_others']:.2f} |"
            )
    return lines


def ratio_lines(offline: dict, runs: dict, reference: dict, top: int) -> list[str]:
    single, many = runs.get(("resnet18", 1)), runs.get(("resnet18", top))
    lines = ["", "### Ratios (resnet18, this run)", ""]
    if single and single["p50_ms"]:
        latency_ratio = single["p50_ms"] / reference["batch1_latency_ms"]
        lines.append(f"- served 1-client p50 / reference batch-1 latency = {single['p50_ms']:.1f} / "
                     f"{reference['batch1_latency_ms']:.1f} = **{latency_ratio:.2f}** "
                     f"(target <= {TARGET_LATENCY_RATIO}: {'met' if latency_ratio <= TARGET_LATENCY_RATIO else 'missed'})")
    if many:
        throughput_ratio = many["throughput"] / reference["batch16_throughput"]
        lines.append(f"- served {top}-client throughput / reference batch-16 throughput = {many['throughput']:.1f} / "
                     f"{reference['batch16_throughput']:.1f} = **{throughput_ratio:.2f}** "
                     f"(target >= {TARGET_THROUGHPUT_RATIO}: {'met' if throughput_ratio >= TARGET_THROUGHPUT_RATIO else 'missed'})")
    for other in (v for v in VARIANTS if v != offline["variant"]):
        name = resnet18_variant_model(other)
        s, m = runs.get((name, 1)), runs.get((name, top))
        if s and m and s["p50_ms"]:
            lines.append(f"- same ratios if resnet18 were served as {other}: "
                         f"{s['p50_ms'] / reference['batch1_latency_ms']:.2f} "
                         f"and {m['throughput'] / reference['batch16_throughput']:.2f}")
    return lines


def memory_lines(served: list[dict]) -> list[str]:
    lines = ["", f"### Memory (MB; PSS right after the load and after {MEMORY_SETTLE_S:.0f} s idle)", "",
             "| server | process | RSS idle | PSS after load | PSS idle |", "|---|---|---|---|---|"]
    for index, part in enumerate(served):
        busy = sum(m["busy_pss_mb"] or 0.0 for m in part["memory"].values())
        idle = sum(m["pss_mb"] or 0.0 for m in part["memory"].values())
        for role, m in part["memory"].items():
            lines.append(f"| {index + 1} | {role} | {m['rss_mb']:.0f} | {fmt(m['busy_pss_mb'], 0)} | {fmt(m['pss_mb'], 0)} |")
        lines.append(f"| {index + 1} | **all (launcher + frontend + workers)** | | **{busy:.0f}** | **{idle:.0f}** |")
    memory = served[-1]["memory"].values()
    busy = sum(m["busy_pss_mb"] or 0.0 for m in memory)
    idle = sum(m["pss_mb"] or 0.0 for m in memory)
    verdict = "met" if max(busy, idle) <= MEMORY_TARGET_MB else "met when idle" if idle <= MEMORY_TARGET_MB else "missed"
    lines += ["", f"Backbone plus two heads (server {len(served)}), one worker each: PSS {busy:.0f} MB right after "
              f"the load, {idle:.0f} MB idle (target <= {MEMORY_TARGET_MB} MB: {verdict})."]
    return lines


def ceiling_lines(offline: dict, runs: dict, top: int) -> list[str]:
    costs, forward = offline["costs"], offline["worker"]["costs"]
    archives, threads = offline["archives"], offline["threads"]
    lines = ["", "### Ceiling (per-image costs measured in-process, this run; forward passes with the workers' "
             f"torch {offline['worker']['torch']})", "",
             f"- preprocessing (decode + resize + crop + normalise), one core: {costs['preprocess_ms']:.2f} ms/image "
             f"(decode alone {costs['decode_ms']:.2f} ms; the val photos are mostly about 400x500).",
             f"- JPEG draft decode on a 12 MP photo ({costs['large_photo']['bytes'] / 1e6:.1f} MB, made from "
             f"{costs['large_photo']['source']}): {costs['large_photo']['draft_ms']:.1f} ms with, "
             f"{costs['large_photo']['full_ms']:.1f} ms without.", "",
             f"| model | variant | forward b1 ms | forward ms/image at b{offline['batching']['batch_size']} "
             f"| worker ceiling img/s | served img/s ({top} clients) | served / ceiling |",
             "|---|---|---|---|---|---|---|"]
    for model, variants in forward.items():
        for variant, value in variants.items():
            name = next((n for n, a in archives.items() if a["backbone"] == model and a["variant"] == variant
                         and not a["head"] and a["batching"] == offline["batching"]), None)
            ceiling_rate, _ = ceiling(costs, value, threads)
            run = runs.get((name, top)) if name else None
            lines.append(f"| {model} | {variant} | {value['forward1_ms']:.1f} | {value['forward_batch_ms_per_image']:.2f} | "
                         f"{ceiling_rate:.0f} | {fmt(run['throughput'] if run else None)} | "
                         f"{fmt(run['throughput'] / ceiling_rate if run else None, 2)} |")
    lines += ["", "Worker ceiling = 1000 / (preprocess ms / cores + forward ms per image): one worker prepares a "
              "batch on all cores, then runs it on all cores; HTTP, the Java frontend and the load generator "
              "(this process) take their CPU from the same two cores (see the CPU column above). What these "
              "figures led to: \"Serving: what was changed, and why\" below."]
    return lines


VARIANT_WORDS = {
    "fp32": "fp32, eager backbone",
    "fp32+onnxruntime": "fp32, the archive's ONNX graph on ONNX Runtime",
    "fp32+openvino": "fp32, the archive's ONNX graph on OpenVINO",
    "bf16+openvino": "bf16, the archive's ONNX graph on OpenVINO",
    "bf16": "bf16 autocast, eager backbone",
}


def guard_lines(guard: dict, offline: dict) -> list[str]:
    """The accuracy guard table: every reduced-precision or compiled variant against fp32 eager."""
    others = [v for v in VARIANTS if v != REFERENCE_VARIANT]
    lines = ["", f"### Accuracy guard (each variant against {REFERENCE_VARIANT} eager, with the workers' torch)", "",
             f"Pass: top-1 agreement >= {GUARD_MIN_TOP1:.0%} and no top-3 probability changed by more than "
             f"{GUARD_MAX_PROB_CHANGE} (val images of all three sets for the ImageNet classifier; heads: prototype, "
             f"{HEAD_SHOTS} shots per class, on that set's val images).", "",
             "| model | variant | images | top-1 agreement | max top-3 change | images over 0.02 | verdict |",
             "|---|---|---|---|---|---|---|"]
    labels = {"efficientnet_lite0": "efficientnet_lite0 (ImageNet classifier)",
              **{f"head_{s}": f"prototype head {s} on efficientnet_lite0" for s in HEAD_SETS}}
    verdicts = {}
    for name, label in labels.items():
        for variant, g in guard[name].items():
            verdicts.setdefault(variant, []).append(g["passed"])
            lines.append(f"| {label} | {variant} | {g['images']} | {g['top1_agreement']:.2%} | "
                         f"{g['max_top3_change']:.4f} | {g['over_limit']} | {'pass' if g['passed'] else 'FAIL'} |")
    lines.append("")
    for variant, r18 in guard["resnet18"].items():
        lines.append(f"resnet18 {variant} (self-made weights, {r18['images']} images): largest logit change / logit "
                     f"spread = {r18['max_relative_logit_change']:.4f} (median {r18['median_relative_logit_change']:.4f}); "
                     f"top-1 agreement {r18['top1_agreement']:.0%} (meaningless with near-uniform logits).  ")
    for variant in others:
        if variant in verdicts:
            passed = all(verdicts[variant])
            lines.append(f"{variant}: {'passes' if passed else 'fails'} the guard"
                         f"{'' if passed else ', so it is not a default'}.  ")
    lines.append(f"Served default this run: {offline['variant']}.")
    return lines


def lever_lines(archives: dict, runs: dict, offline: dict, costs: dict, top: int) -> list[str]:
    """Each resnet18 variant against the default archive, at 1 and ``top`` clients, same server."""
    base1, base_top = runs.get(("resnet18", 1)), runs.get(("resnet18", top))
    if not base1 or not base_top:
        return []
    lines = ["", "### Levers (resnet18; each variant changes one thing against the default archive, same server)", "",
             f"| variant | 1-client p50 ms | vs default | {top}-client img/s | vs default |", "|---|---|---|---|---|"]
    for name in archives:
        one, many = runs.get((name, 1)), runs.get((name, top))
        if archives[name]["backbone"] != "resnet18" or not one or not many:
            continue
        a, b = archives[name], archives[name]["batching"]
        label = (f"{name}: {a['variant']}, batch {b['batch_size']}, delay {b['max_batch_delay_ms']} ms, "
                 f"{b['workers']} worker(s) x {b['torch_threads'] or offline['threads'] // b['workers']} threads")
        lines.append(f"| {label} | {fmt(one['p50_ms'])} | {fmt(_ratio(one['p50_ms'], base1['p50_ms']), 2)} | "
                     f"{many['throughput']:.1f} | {fmt(_ratio(many['throughput'], base_top['throughput']), 2)} |")
    pre = costs["batch_preprocess"]
    lines += ["", f"Preprocessing a batch of {pre['batch_size']} in-process: one image after another "
              f"{pre['serial_ms_per_image']:.2f} ms/image, the handler's way (decode + resize on "
              f"{offline['threads']} threads, one normalisation per batch) {pre['threaded_ms_per_image']:.2f} ms/image."]
    return lines


def _ratio(a, b):
    return a / b if a is not None and b else None
