"""Benchmark of the FRR feature cache at scale (not a test).

Builds synthetic caches (`--sizes`, default 10k, 100k and 1M entries of 5 x 2048 features, shards of
`--shard-size` entries written by `FRRFeatureCache.write_shard`), then, for each, in a fresh subprocess: opens the
cache (first open: the index is built from the shard headers and saved; reopen: the saved index is read) and does
`--lookups` random single-key lookups (`cache.get`). It prints entries, disk size, open time, peak RSS growth (VmHWM
after the open and the lookups minus VmRSS after the imports, the high-water mark reset after the imports) and
lookups/s, wall-clock and per CPU second. Both runs look up the same random keys, so the reopen's rows come from
the page cache: on a cache larger than the page cache the first run's wall-clock rate is the disk's random-read
rate. The lookups check that each row read back is the one written.

With `--feature-diff` it also reports what float16 storage changes: the max-abs and max-relative difference between
the float32 ResNet-152 features (random weights, nothing downloaded) of a few synthetic images and the same
features stored in float16 and read back.

    python benchmarks/bench_cache.py --sizes 10000 100000 1000000 --dtype float16 --feature-diff

The 1M cache takes 20 GB in float16 (40 GB in float32): check the free disk first (`df -h /tmp`); `--dir` chooses
where the caches go (deleted at the end unless `--keep`).
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from processing_pmner.image_feature_cache import FRRFeatureCache  # noqa: E402


def log(message: str):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def build(cache_dir: str, entries: int, objects: int, dim: int, shard_size: int, dtype: str) -> FRRFeatureCache:
    """A cache of `entries` keys `img-<i>` whose features hold i in their first value (checked on lookup)."""
    cache = FRRFeatureCache(cache_dir, f"bench-{entries}", dtype=dtype)
    block = torch.rand(shard_size, objects, dim) * 4  # (S, M, D), shared by every shard: building stays I/O-bound
    masks = torch.ones(shard_size, objects, dtype=torch.bool)  # (S, M)
    for start in range(0, entries, shard_size):
        count = min(shard_size, entries - start)
        features = block[:count].clone()
        features[:, 0, 0] = torch.arange(start, start + count, dtype=torch.float32) % 2048  # exact in float16
        detections = torch.arange(start, start + count, dtype=torch.int32) % (objects + 1)
        cache.write_shard([f"img-{index}" for index in range(start, start + count)], features, masks[:count],
                          num_detections=detections)
    return cache


def measure(cache_dir: str, fingerprint: str, dtype: str, lookups: int, entries: int) -> dict:
    """In a fresh process: peak RSS growth and time to open the cache and do `lookups` random lookups."""
    baseline = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    generator = np.random.default_rng(0)
    wanted = [int(index) for index in generator.integers(0, entries, lookups)]
    keys = [f"img-{index}" for index in wanted]
    start = time.perf_counter()
    cache = FRRFeatureCache(cache_dir, fingerprint, dtype=dtype).load()
    opened, opened_cpu = time.perf_counter(), time.process_time()
    wrong = 0
    for index, key in zip(wanted, keys):
        features, mask = cache.get(key)
        wrong += int(features[0, 0].item() != index % 2048)
    done, done_cpu = time.perf_counter(), time.process_time()
    if len(cache) != entries or wrong:
        raise SystemExit(f"cache read back wrong: {len(cache)} entries (expected {entries}), {wrong} wrong rows")
    return {
        "open_s": opened - start,
        "lookups_per_s": lookups / (done - opened),
        "lookups_per_cpu_s": lookups / (done_cpu - opened_cpu),  # insensitive to other processes on the machine
        "peak_rss_growth_mb": (status_kb("VmHWM") - baseline) / 1024,
        "rss_after_mb": (status_kb("VmRSS") - baseline) / 1024,
    }


def measure_in_subprocess(cache: FRRFeatureCache, lookups: int, entries: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--measure", cache.cache_dir, cache.fingerprint, cache.dtype,
               str(lookups), str(entries)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"measurement failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def disk_size(folder: str) -> int:
    return sum(entry.stat().st_blocks * 512 for entry in os.scandir(folder) if entry.is_file())


def feature_difference(images: int = 8) -> tuple[float, float, float]:
    """Max-abs and max-relative difference between float32 ResNet-152 features and the same stored in float16, and
    the largest feature value."""
    import torchvision

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_frr import synthetic_images
    from PIL import Image

    torch.manual_seed(0)
    model = torchvision.models.resnet152(weights=None)
    model.fc = torch.nn.Identity()
    # Random weights with BatchNorm in eval mode (running statistics 0/1) blow the features beyond float16's range;
    # batch statistics (train mode) keep them at the scale of trained features.
    model.train()
    with tempfile.TemporaryDirectory() as folder:
        paths = synthetic_images(folder, images, size=(224, 224))
        batch = torch.stack([
            torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
            for path in paths
        ])  # (N, 3, 224, 224)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        features = model((batch - mean) / std)  # (N, 2048)
    with tempfile.TemporaryDirectory() as folder:
        cache = FRRFeatureCache(folder, "diff", dtype="float16")
        keys = [f"image-{index}" for index in range(images)]
        cache.write_shard(keys, features.unsqueeze(1), torch.ones(images, 1, dtype=torch.bool))
        stored = cache.load().get_many(keys)[0][:, 0]  # (N, 2048) read back as float32
    difference = (stored - features).abs()
    relative = difference / features.abs().clamp_min(1e-6)
    return difference.max().item(), relative[features.abs() > 1e-3].max().item(), features.abs().max().item()


def drop_page_cache():
    """Writes the dirty pages and empties the page cache (needs root); exits naming the file when it cannot."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
    except OSError as error:
        raise SystemExit(f"--cold: cannot empty the page cache through /proc/sys/vm/drop_caches ({error})")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        cache_dir, fingerprint, dtype, lookups, entries = sys.argv[2:7]
        print(json.dumps(measure(cache_dir, fingerprint, dtype, int(lookups), int(entries))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--objects", type=int, default=5)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--lookups", type=int, default=10_000)
    parser.add_argument("--dir", default=None, help="where the caches are built (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the caches")
    parser.add_argument("--feature-diff", action="store_true", help="also measure the float16 storage difference")
    parser.add_argument("--cold", action="store_true", help="empty the page cache before the first run (Linux, root): "
                        "its rows are then read from disk, whatever the build left in memory")
    args = parser.parse_args()

    root = args.dir or tempfile.mkdtemp(prefix="bench-cache-")
    os.makedirs(root, exist_ok=True)
    bytes_per_entry = args.objects * args.dim * (2 if args.dtype == "float16" else 4)
    rows = []
    try:
        for entries in args.sizes:
            needed = entries * bytes_per_entry
            free = shutil.disk_usage(root).free
            if needed > 0.9 * free:
                raise SystemExit(f"{entries} entries need {needed / 1e9:.1f} GB; {root} has {free / 1e9:.1f} GB free")
            log(f"building {entries} entries ({needed / 1e9:.1f} GB, {args.dtype}) in {root}")
            started = time.perf_counter()
            cache = build(root, entries, args.objects, args.dim, args.shard_size, args.dtype)
            build_s = time.perf_counter() - started
            log(f"built in {build_s:.0f} s; measuring the first open (index built from the shard headers)")
            if args.cold:
                drop_page_cache()
            first = measure_in_subprocess(cache, args.lookups, entries)
            log("measuring a reopen (saved index)")
            again = measure_in_subprocess(cache, args.lookups, entries)
            rows.append((entries, disk_size(cache.folder), len(cache.shard_files()), first, again))
            log(f"{entries}: first {first}, reopen {again}")
            if not args.keep:
                shutil.rmtree(cache.folder)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\ncommand: python {' '.join(shlex.quote(argument) for argument in sys.argv)}")
    print(f"features per entry: {args.objects} x {args.dim} {args.dtype}; shards of {args.shard_size}; "
          f"{args.lookups} random single-key lookups per run, each in a fresh process\n")
    print("| entries | shards | disk | first open | peak RSS growth | lookups/s (per CPU s) | reopen | "
          "peak RSS growth | lookups/s (per CPU s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for entries, size, shards, first, again in rows:
        print(f"| {entries:,} | {shards:,} | {size / 1e9:.2f} GB | {first['open_s']:.2f} s | "
              f"{first['peak_rss_growth_mb']:.1f} MB | {first['lookups_per_s']:,.0f} "
              f"({first['lookups_per_cpu_s']:,.0f}) | {again['open_s']:.2f} s | {again['peak_rss_growth_mb']:.1f} MB | "
              f"{again['lookups_per_s']:,.0f} ({again['lookups_per_cpu_s']:,.0f}) |")
    print("\nfirst open: the index is built from the shard headers and saved; reopen: the saved index is read. Peak "
          "RSS growth: VmHWM after the open and the lookups minus VmRSS after the imports. Both runs look up the same "
          "keys: the first run reads their rows from disk unless the page cache still holds them from the build (with "
          "--cold it is emptied first), the reopen reads them from the page cache. Lookups per CPU second leave out disk waits and other processes.")
    if args.feature_diff:
        max_abs, max_relative, largest = feature_difference()
        print(f"\nfloat16 storage of ResNet-152 features (random weights, BatchNorm on batch statistics, 8 synthetic 224x224 images, 2048 values "
              f"each, largest {largest:.3g}): max abs difference {max_abs:.3g}, max relative difference "
              f"{max_relative:.3g}")


if __name__ == "__main__":
    main()
