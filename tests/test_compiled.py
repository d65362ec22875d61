"""Backbones compiled with AOTInductor (handlers/compile_backbone.py builds, handlers/compiled.py
runs): same answers as eager, used only where they were built for, cached per backbone and machine."""

import json
import logging
import subprocess
import textwrap

from handlers.layout import extract_archive
from handlers.backbones import get_backbone
from handlers.machine import runtime_signature
from imagerec.compile_backbone import compile_in_environment
from handlers.compiled import load_compiled_features
from handlers.layout import read_archive_info
from handlers.recognizer import load_recognizer
from imagerec.paths import PROJECT_ROOT
from imagerec.torchserve import serving_python
from tests.support import run_build


def run_in_serving_environment(code: str) -> str:
    result = subprocess.run([str(serving_python()), "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_the_archive_records_the_torch_and_machine_it_was_compiled_for(efficientnet_archive):
    compiled = read_archive_info(efficientnet_archive)["compiled"]
    serving_torch = run_in_serving_environment("import torch; print(torch.__version__)")
    assert compiled["format"] == "aoti"
    assert compiled["files"] == {"single": "features_b1.pt2", "batched": "features_batched.pt2"}
    assert compiled["torch"] == serving_torch
    assert compiled["max_batch"] == 8 and compiled["threads"] >= 1
    assert compiled["cpu_flags"] and compiled["cpu_model"]


def test_compiled_answers_equal_eager_in_the_serving_environment(efficientnet_archive, datasets_dir, tmp_path):
    """Real photos: a batch of 11 (larger than the compiled limit of 8: it is split) and single images
    (the single-image package)."""
    unpacked = extract_archive(efficientnet_archive, tmp_path / "unpacked")
    photos = sorted((datasets_dir / "hymenoptera" / "val" / "bees").iterdir())[:11]
    out = run_in_serving_environment(f"""
        import json, torch
        from handlers.imaging import ImagePreprocessor
        from handlers.recognizer import load_recognizer
        compiled = load_recognizer({str(unpacked)!r})
        eager = load_recognizer({str(unpacked)!r}, compile=False)
        preprocess = ImagePreprocessor(eager.backbone.preprocessing)
        images = torch.stack([preprocess(open(p, "rb").read()) for p in {[str(p) for p in photos]!r}])
        with torch.inference_mode():
            p_compiled = compiled.recognizer(images).softmax(1)
            p_single = torch.cat([compiled.recognizer(image[None]) for image in images]).softmax(1)
            p_eager = eager.recognizer(images).softmax(1)
        print(json.dumps({{
            "compiled": compiled.recognizer.compiled, "eager": eager.recognizer.compiled,
            "max_difference": max((p_compiled - p_eager).abs().max().item(), (p_single - p_eager).abs().max().item()),
            "same_top1": bool((p_compiled.argmax(1) == p_eager.argmax(1)).all()),
            "rows": len(p_compiled),
        }}))
    """)
    result = json.loads(out)
    assert result["compiled"] is True and result["eager"] is False
    assert result["rows"] == 11 and result["same_top1"]
    assert result["max_difference"] < 1e-4, result


def test_another_torch_runs_the_eager_backbone_with_a_warning(efficientnet_archive, tmp_path, caplog):
    """The tests' own environment has another torch build than the serving one the package was made for."""
    caplog.set_level(logging.WARNING, logger="handlers.compiled")
    loaded = load_recognizer(extract_archive(efficientnet_archive, tmp_path / "unpacked"))
    assert loaded.recognizer.compiled is False
    assert "compiled backbone not used, running eager instead" in caplog.text
    assert "torch: built for" in caplog.text


def test_a_damaged_package_runs_the_eager_backbone_with_a_warning(tmp_path, caplog):
    """Built for exactly this torch, CPU and thread count, but the file is not a package."""
    import torch

    caplog.set_level(logging.WARNING, logger="handlers.compiled")
    (tmp_path / "features_b1.pt2").write_bytes(b"not a package")
    record = {**runtime_signature(torch.get_num_threads()), "max_batch": 1, "files": {"single": "features_b1.pt2"}}
    assert load_compiled_features(tmp_path, record) is None
    assert "cannot load it" in caplog.text


def test_the_served_worker_runs_the_compiled_backbone(imagenet_server):
    log = (imagenet_server.log_dir / "model_log.log").read_text()
    assert "backbone efficientnet_lite0 (fp32, compiled)" in log
    assert "backbone resnet18 (fp32, compiled)" in log


def test_a_second_compilation_comes_from_the_cache(efficientnet_archive, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="imagerec.compile_backbone")
    compiled = read_archive_info(efficientnet_archive)["compiled"]
    backbone = get_backbone("efficientnet_lite0")
    record = compile_in_environment(serving_python(), backbone.name, backbone.resolve_weights(),
                                    compiled["max_batch"], compiled["threads"], tmp_path)
    assert "from the cache" in caplog.text and "compiling" not in caplog.text
    assert record == compiled
    assert all((tmp_path / name).stat().st_size > 1_000_000 for name in record["files"].values())


def test_compiling_is_fp32_only_and_bf16_builds_eager(resnet18_weights, tmp_path):
    refused = run_build("--weights", str(resnet18_weights), "--out", str(tmp_path), "--precision", "bf16",
                        "--compile", "aoti")
    assert refused.returncode == 2 and "supports --precision fp32 only" in refused.stderr
    built = run_build("--weights", str(resnet18_weights), "--out", str(tmp_path), "--precision", "bf16")
    assert built.returncode == 0, built.stderr
    assert "compiled" not in read_archive_info(built.stdout.strip().splitlines()[-1])
