"""Benchmark of the FRR image processor (not a test).

Runs the full FRR path (read + decode + detect + crop + ResNet) of `PMNERImageProcessor` with the paper's real
architectures (fasterrcnn_resnet50_fpn_v2 + resnet152, random weights: nothing is downloaded) on synthetic JPEG
files, next to the bare model forwards on the very tensors the processor fed them (the overhead ratio is the
processor's own cost: image reading, resizing, cropping, normalising), and the dataset cache: the first
`extract_dataset_features` run and the second one that reads the cache.

With random weights no detection would pass the 0.95 threshold, so the benchmark sets `score_threshold=0` (and the
detector's own `box_score_thresh=0`): every image gives `max_objects` crops, the heaviest (paper) case.

    python benchmarks/bench_frr.py --num-images 8   # about 3 minutes on 2 CPU cores
"""

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image


def synthetic_images(folder: str, count: int, size=(640, 480)) -> list[str]:
    """Photo-like JPEGs (smooth colour fields plus noise), the typical size of a tweet image."""
    generator = np.random.default_rng(0)
    paths = []
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    for index in range(count):
        phase = generator.uniform(0, 2 * np.pi, 3)
        base = np.stack(
            [127 + 100 * np.sin(x / (40 + 10 * c) + y / (60 + 7 * c) + phase[c]) for c in range(3)], axis=-1
        )
        image = np.clip(base + generator.normal(0, 12, base.shape), 0, 255).astype(np.uint8)  # (H, W, 3)
        path = os.path.join(folder, f"image-{index:04d}.jpg")
        Image.fromarray(image).save(path, quality=90)
        paths.append(path)
    return paths


def log(message: str):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-objects", type=int, default=5)
    parser.add_argument("--detector", default="fasterrcnn_resnet50_fpn_v2")
    parser.add_argument("--backbone", default="resnet152")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import datasets

    from processing_pmner import PMNERImageProcessor

    datasets.disable_progress_bars()
    workdir = tempfile.mkdtemp(prefix="bench-frr-")
    paths = synthetic_images(workdir, args.num_images)
    settings = dict(
        detector=args.detector,
        detector_weights="random:0",
        detector_kwargs={"box_score_thresh": 0.0},
        backbone=args.backbone,
        backbone_weights="random:0",
        score_threshold=0.0,
        max_objects=args.max_objects,
        batch_size=args.batch_size,
    )
    processor = PMNERImageProcessor(**settings)
    start = time.perf_counter()
    processor.load_models(args.device)
    build_seconds = time.perf_counter() - start

    captured = {"detector": [], "backbone": []}
    hooks = [
        processor._detector_module.register_forward_pre_hook(lambda module, inputs: captured["detector"].append(inputs[0])),
        processor._backbone_module.register_forward_pre_hook(lambda module, inputs: captured["backbone"].append(inputs[0])),
    ]
    log("models built; warm-up")
    processor(paths[:1], device=args.device)  # warm-up (allocator, kernels)
    captured["detector"].clear()
    captured["backbone"].clear()

    log("full path and bare forwards, interleaved batch by batch (drifts of the CPU affect both alike)")
    full_seconds = detector_seconds = backbone_seconds = 0.0
    features = []
    for first in range(0, len(paths), args.batch_size):
        captured["detector"].clear()
        captured["backbone"].clear()
        start = time.perf_counter()
        output = processor(paths[first : first + args.batch_size], device=args.device)
        full_seconds += time.perf_counter() - start
        features.append(output)
        detector_inputs, backbone_inputs = list(captured["detector"]), list(captured["backbone"])
        with torch.inference_mode():
            start = time.perf_counter()
            for inputs in detector_inputs:
                processor._detector_module(inputs)  # list of (3, H, W) -> detections
            detector_seconds += time.perf_counter() - start
            start = time.perf_counter()
            for crops in backbone_inputs:
                processor._backbone_module(crops)  # (N, 3, 224, 224) -> (N, 2048)
            backbone_seconds += time.perf_counter() - start
    for hook in hooks:
        hook.remove()
    visual_features = torch.cat([output["visual_features"] for output in features])  # (images, M, 2048)
    objects = int(sum(output["visual_mask"].sum() for output in features))
    bare_seconds = detector_seconds + backbone_seconds

    log("dataset, first run")
    dataset = datasets.Dataset.from_dict({"image_id": [os.path.basename(p) for p in paths], "image": paths})
    cache_dir = os.path.join(workdir, "cache")
    start = time.perf_counter()
    processor.extract_dataset_features(dataset, cache_dir=cache_dir, device=args.device, progress=False)
    first_run = time.perf_counter() - start
    log("dataset, second run")
    processor.save_pretrained(os.path.join(workdir, "saved"))
    # a new process would start like this: settings and weights files located, no models built (the cache key uses
    # the saved weights' sha256)
    fresh = PMNERImageProcessor.from_pretrained(os.path.join(workdir, "saved"))
    start = time.perf_counter()
    cached = fresh.extract_dataset_features(dataset, cache_dir=cache_dir, device=args.device, progress=False)
    second_run = time.perf_counter() - start
    assert not fresh.models_built, "the second run should read the cache only"
    assert np.allclose(np.asarray(cached[:]["visual_features"]), visual_features.numpy(), atol=1e-4)

    count = args.num_images
    print(f"command: {' '.join(shlex.quote(part) for part in [sys.executable, *sys.argv])}")
    print(
        f"device: {args.device}, torch threads: {torch.get_num_threads()}, CPU cores: {os.cpu_count()}, "
        f"images: {count} (640x480 JPEG), objects cropped: {objects}, batch size: {args.batch_size}, "
        f"models built in {build_seconds:.1f} s (random weights, seed 0)\n"
    )
    rows = [
        ("full FRR path (read, decode, detect, crop, ResNet)", full_seconds),
        (f"bare {args.detector} forward", detector_seconds),
        (f"bare {args.backbone} forward ({objects} crops)", backbone_seconds),
        ("bare forwards together", bare_seconds),
        ("extract_dataset_features, first run (computes, writes cache)", first_run),
        ("extract_dataset_features, second run (reads cache)", second_run),
    ]
    print("| step | seconds | images/s |")
    print("|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {count / seconds:.2f} |")
    print(f"\noverhead ratio (full path / bare forwards): {full_seconds / bare_seconds:.3f}")
    print(f"cache speed-up (first run / second run): {first_run / second_run:.0f}x")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
