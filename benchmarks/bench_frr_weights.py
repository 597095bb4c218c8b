"""Size and accuracy of the FRR weights saved with the processor in float32, bfloat16 and float16 (not a test).

Builds the paper's FRR networks (fasterrcnn_resnet50_fpn_v2 + resnet152) with random weights from a seed (nothing is
downloaded), saves the processor once per `frr_weights_dtype`, loads each folder back with `from_pretrained` (the
weights are computed in float32 again) and compares the features of synthetic 640x480 JPEGs with drawn shapes
against the float32 folder: max and mean absolute difference, relative to the mean absolute float32 feature, the
lowest cosine similarity of an object's feature, and how many images get the same boxes. A second set of rows has
no detector (the whole image is the only object), which isolates the backbone's precision: with random detector
weights all scores are nearly tied, so the smallest change of the detector's weights reorders its top boxes.

With random detector weights no detection passes the 0.95 threshold (scores are near 1/91), so the benchmark sets
`score_threshold=0` and the detector's own `box_score_thresh=0`: every image gives `max_objects` objects (the top
detections); `add_whole_image` stays on (the default).

    python benchmarks/bench_frr_weights.py --num-images 4   # about 3 minutes on 2 CPU cores
"""

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time

import torch
from PIL import Image, ImageDraw


def synthetic_images(folder: str, count: int, size=(640, 480)) -> list[str]:
    """JPEGs with a gradient background and drawn rectangles, ellipses and lines (seeded)."""
    generator = torch.Generator().manual_seed(0)
    paths = []
    width, height = size
    for index in range(count):
        top, bottom = torch.randint(0, 256, (2, 3), generator=generator).tolist()
        image = Image.new("RGB", size)
        draw = ImageDraw.Draw(image)
        for row in range(height):
            draw.line([(0, row), (width, row)], fill=tuple(t + (b - t) * row // height for t, b in zip(top, bottom)))
        for shape in range(6):
            x1, y1 = torch.randint(0, width - 60, (1,), generator=generator).item(), torch.randint(0, height - 60, (1,), generator=generator).item()
            x2, y2 = x1 + 40 + torch.randint(0, 200, (1,), generator=generator).item(), y1 + 40 + torch.randint(0, 160, (1,), generator=generator).item()
            colour = tuple(torch.randint(0, 256, (3,), generator=generator).tolist())
            [draw.rectangle, draw.ellipse, draw.line][shape % 3]([x1, y1, x2, y2], fill=colour, **({"width": 9} if shape % 3 == 2 else {}))
        path = os.path.join(folder, f"shapes-{index:03d}.jpg")
        image.save(path, quality=90)
        paths.append(path)
    return paths


def log(message: str):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--detector", default="fasterrcnn_resnet50_fpn_v2")
    parser.add_argument("--backbone", default="resnet152")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from processing_pmner import PMNERImageProcessor

    workdir = tempfile.mkdtemp(prefix="bench-frr-weights-")
    paths = synthetic_images(workdir, args.num_images)
    settings = dict(
        detector=args.detector,
        detector_weights=f"random:{args.seed}",
        detector_kwargs={"box_score_thresh": 0.0},
        backbone=args.backbone,
        backbone_weights=f"random:{args.seed}",
        score_threshold=0.0,
    )
    backbone_only = dict(detector=None, backbone=args.backbone, backbone_weights=f"random:{args.seed}")
    rows = []
    for mode, mode_settings in (("detector + backbone", settings), ("backbone only (whole image)", backbone_only)):
        reference = None
        for dtype in ("float32", "bfloat16", "float16"):
            folder = os.path.join(workdir, f"{len(rows)}-{dtype}")
            log(f"{mode}: building, saving and reloading ({dtype})")
            PMNERImageProcessor(**mode_settings, frr_weights_dtype=dtype).save_pretrained(folder)
            sizes = {name: os.path.getsize(os.path.join(folder, f"frr_{name}.safetensors"))
                     for name in ("detector", "backbone") if os.path.exists(os.path.join(folder, f"frr_{name}.safetensors"))}
            loaded = PMNERImageProcessor.from_pretrained(folder)
            start = time.perf_counter()
            output = loaded(paths, device=args.device, return_boxes=True)
            seconds = time.perf_counter() - start
            features, boxes = output["visual_features"], output["visual_boxes"]  # (N, M, 2048), (N, M, 4)
            mask = output["visual_mask"]  # (N, M)
            if reference is None:
                reference = (features, boxes)
            difference = (features - reference[0]).abs()[mask]  # (objects, 2048)
            cosine = torch.nn.functional.cosine_similarity(features[mask], reference[0][mask], dim=-1)  # (objects,)
            same_boxes = sum(torch.allclose(b, r, atol=0.5) for b, r in zip(boxes, reference[1]))
            rows.append((mode, dtype, sum(sizes.values()), difference.max().item(), difference.mean().item(),
                         difference.mean().item() / reference[0][mask].abs().mean().item(), cosine.min().item(),
                         same_boxes, seconds))
            del loaded

    print(f"command: {' '.join(shlex.quote(part) for part in [sys.executable, *sys.argv])}")
    print(f"{args.detector} + {args.backbone}, weights random:{args.seed}; {args.num_images} synthetic 640x480 JPEGs; "
          f"with the detector, 5 objects each (score_threshold=0, box_score_thresh=0); device {args.device}\n")
    print("| FRR networks | frr_weights_dtype | saved MB | max abs diff | mean abs diff | "
          "mean diff / mean abs feature | min cosine | images with the same boxes | extract s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, dtype, size, largest, mean, relative, cosine, same_boxes, seconds in rows:
        print(f"| {mode} | {dtype} | {size / 1e6:.1f} | {largest:.3g} | {mean:.3g} | {relative:.2e} | {cosine:.6f} | "
              f"{same_boxes}/{args.num_images} | {seconds:.1f} |")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
