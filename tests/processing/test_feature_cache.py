"""Tests of the FRR feature cache: storage dtypes, the compact index, claims between concurrent writers, killed
writers and stale claims, and the detection counts that `extract_dataset_features` adds."""

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from processing_pmner.image_feature_cache import FRRFeatureCache
from processing_pmner.image_feature_claims import _process_start


def random_entries(count: int, objects: int = 3, dim: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.rand(count, objects, dim, generator=generator) * 10  # (n, M, D)
    masks = torch.rand(count, objects, generator=generator) > 0.3  # (n, M)
    detections = torch.randint(0, objects + 1, (count,), generator=generator, dtype=torch.int32)  # (n,)
    return [f"img-{seed}-{index}" for index in range(count)], features, masks, detections


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_and_lookups_after_reopening(tmp_path, dtype):
    keys, features, masks, detections = random_entries(12)
    cache = FRRFeatureCache(tmp_path, "fp", dtype=dtype)
    cache.write_shard(keys[:7], features[:7], masks[:7], num_detections=detections[:7])
    cache.write_shard(keys[7:], features[7:], masks[7:], num_detections=detections[7:])

    reopened = FRRFeatureCache(tmp_path, "fp", dtype=dtype).load()
    assert len(reopened) == 12 and os.path.isfile(reopened.index_file)
    order = [11, 0, 8, 3, 3]
    got_features, got_masks, got_detections = reopened.get_many([keys[index] for index in order])
    expected = features[order] if dtype == "float32" else features[order].half().float()
    assert got_features.dtype == torch.float32 and torch.equal(got_features, expected)
    assert torch.equal(got_masks, masks[order]) and torch.equal(got_detections, detections[order])
    counts = reopened.num_detections_at(reopened.positions([keys[index] for index in order]))
    assert counts.tolist() == detections[order].tolist()
    single_features, single_mask = reopened.get("img-0-5")
    assert torch.equal(single_mask, masks[5]) and reopened.num_detections("img-0-5") == int(detections[5])
    assert "img-0-5" in reopened and "img-0-12" not in reopened
    with pytest.raises(KeyError, match="img-0-12"):
        reopened.get("img-0-12")
    # the compatible views: keys, positions, rows by position
    assert sorted(reopened.index) == sorted(keys)
    position = reopened.index["img-0-9"]
    reference = features[9] if dtype == "float32" else features[9].half().float()
    assert torch.equal(reopened.features[position], reference) and torch.equal(reopened.masks[position], masks[9])
    assert torch.equal(single_features, features[5] if dtype == "float32" else features[5].half().float())
    assert reopened.features.shape == (12, 3, 8) and reopened.index.get("nope", -1) == -1
    # opened from the saved index alone (no shard header read until a lookup needs it)
    third = FRRFeatureCache(tmp_path, "fp", dtype=dtype).load()
    assert torch.equal(third.get_many(keys)[0], reopened.get_many(keys)[0])


def test_lookups_over_more_shards_than_open_files_keep_a_bounded_number_open(tmp_path, monkeypatch):
    import processing_pmner.image_feature_cache as feature_cache

    monkeypatch.setattr(feature_cache, "_OPEN_FILES", 2)
    cache = FRRFeatureCache(tmp_path, "fp")
    entries = [random_entries(2, seed=seed) for seed in range(5)]  # five shards of two keys
    for keys, features, masks, detections in entries:
        cache.write_shard(keys, features, masks, num_detections=detections)
    reopened = FRRFeatureCache(tmp_path, "fp").load()
    before = len(os.listdir("/proc/self/fd"))
    for round_ in range(3):
        for keys, features, masks, _ in entries:
            for row, key in enumerate(keys):
                got_features, got_mask = reopened.get(key)
                assert torch.equal(got_features, features[row]) and torch.equal(got_mask, masks[row])
    assert len(reopened._files) == 2 and len(os.listdir("/proc/self/fd")) <= before + 2
    assert 64 <= feature_cache._open_files_limit() <= 1024


def test_fp16_and_fp32_caches_never_mix(tmp_path):
    keys, features, masks, detections = random_entries(4)
    fp32 = FRRFeatureCache(tmp_path, "fp")
    fp16 = fp32.with_dtype("fp16")
    assert fp16.folder != fp32.folder and fp16.folder.endswith("-fp16")
    fp32.write_shard(keys, features, masks, num_detections=detections)
    assert len(fp16.load()) == 0 and len(fp32.load()) == 4
    shard = fp32.shard_files()[0]
    os.makedirs(fp16.folder, exist_ok=True)
    os.link(shard, os.path.join(fp16.folder, os.path.basename(shard)))  # an fp32 shard put into the fp16 folder
    foreign = os.path.join(fp16.folder, os.path.basename(shard))
    assert len(FRRFeatureCache(tmp_path, "fp", dtype="float16").load()) == 0  # never read as float16 features
    assert not os.path.exists(foreign) and os.path.exists(foreign + ".corrupt")  # set aside, not deleted
    with pytest.raises(ValueError, match="cache dtype must be one of"):
        FRRFeatureCache(tmp_path, "fp", dtype="bfloat16")
    with pytest.raises(ValueError, match="beyond float16's range"):
        fp16.write_shard(["big"], torch.full((1, 3, 8), 1e6), torch.ones(1, 3, dtype=torch.bool))


def test_a_key_in_two_shards_keeps_its_first_copy_and_a_hash_collision_is_an_error(tmp_path, monkeypatch):
    from processing_pmner import image_feature_cache as feature_cache

    keys, features, masks, detections = random_entries(3)
    cache = FRRFeatureCache(tmp_path, "fp")
    cache.write_shard(keys, features, masks, num_detections=detections)
    cache.load()
    cache.write_shard(keys[:1], features[:1] + 1, masks[:1], num_detections=detections[:1])  # e.g. two old runs
    assert len(cache.refresh()) == 3 and torch.equal(cache.get(keys[0])[0], features[0])
    assert list(cache.keys()) == keys
    monkeypatch.setattr(feature_cache, "key_hashes", lambda keys: np.zeros(len(list(keys)), dtype=np.uint64))
    os.remove(cache.index_file)  # every shard indexed again
    with pytest.raises(ValueError, match="have the same 64-bit hash"):
        FRRFeatureCache(tmp_path, "fp").load()


def test_a_damaged_or_outdated_index_is_rebuilt_from_the_shards(tmp_path):
    keys, features, masks, detections = random_entries(6)
    cache = FRRFeatureCache(tmp_path, "fp")
    first = cache.write_shard(keys[:3], features[:3], masks[:3], num_detections=detections[:3])
    cache.write_shard(keys[3:], features[3:], masks[3:], num_detections=detections[3:])
    cache.load()
    with open(cache.index_file, "r+b") as handle:
        handle.truncate(100)
    assert torch.equal(FRRFeatureCache(tmp_path, "fp").load().get_many(keys)[0], features)
    os.remove(first)  # the saved index names a deleted shard
    reopened = FRRFeatureCache(tmp_path, "fp").load()
    assert len(reopened) == 3 and keys[0] not in reopened and torch.equal(reopened.get(keys[4])[0], features[4])


def test_a_truncated_shard_is_set_aside_and_its_keys_are_missing(tmp_path):
    keys, features, masks, detections = random_entries(4)
    cache = FRRFeatureCache(tmp_path, "fp")
    path = cache.write_shard(keys, features, masks, num_detections=detections)
    kept = cache.write_shard(["other"], features[:1], masks[:1], num_detections=detections[:1])
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 10)
    reopened = FRRFeatureCache(tmp_path, "fp").load()
    assert len(reopened) == 1 and "other" in reopened and keys[0] not in reopened  # computed again where needed
    assert os.path.exists(path + ".corrupt") and os.path.exists(kept)


@pytest.mark.parametrize("read", ["get_many", "get"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_overwritten_feature_bytes_are_caught_by_the_checksums(tmp_path, dtype, read):
    from processing_pmner.image_feature_cache import CorruptCacheShard

    keys, features, masks, detections = random_entries(4)
    cache = FRRFeatureCache(tmp_path, "fp", dtype=dtype)
    path = cache.write_shard(keys, features, masks, num_detections=detections)
    cache.load()
    overwrite_features(path, offset=3 * 8 * 2)  # same size, other features (in the row of keys[1])
    fresh = FRRFeatureCache(tmp_path, "fp", dtype=dtype).load()  # the header is intact: it indexes
    with pytest.raises(CorruptCacheShard, match=f"{os.path.basename(path)} is corrupt .*checksums"):
        if read == "get_many":
            fresh.get_many(keys)
        else:
            for key in keys:  # the overwritten bytes are in one of the rows
                fresh.get(key)
    assert os.path.exists(path + ".corrupt") and not os.path.exists(path)
    assert len(FRRFeatureCache(tmp_path, "fp", dtype=dtype).load()) == 0
    # an intact shard reads with its checksums verified, single rows too
    again = FRRFeatureCache(tmp_path, "fp", dtype=dtype)
    again.write_shard(keys, features, masks, num_detections=detections)
    again.load()
    assert torch.equal(again.get(keys[2])[1], masks[2])


def overwrite_features(path: str, offset: int) -> None:
    """Overwrites 4 bytes of a shard's `visual_features` tensor, `offset` bytes into it (the file keeps its size)."""
    from processing_pmner.image_feature_cache import _Shard

    start = _Shard(path).tensors["visual_features"][2] + offset
    data = bytearray(open(path, "rb").read())
    data[start : start + 4] = bytes(4) if data[start : start + 4] != bytes(4) else b"\x01\x02\x03\x04"
    open(path, "wb").write(bytes(data))


def test_a_deleted_index_is_rebuilt_from_the_shards(tmp_path):
    keys, features, masks, detections = random_entries(5)
    cache = FRRFeatureCache(tmp_path, "fp")
    cache.write_shard(keys, features, masks, num_detections=detections)
    cache.load()
    os.remove(cache.index_file)
    reopened = FRRFeatureCache(tmp_path, "fp").load()
    assert len(reopened) == 5 and os.path.isfile(reopened.index_file)
    torch.testing.assert_close(reopened.get_many(keys)[0], features)


def test_extraction_recomputes_corrupt_entries_from_their_images(tmp_path):
    import datasets
    from PIL import Image

    from processing_pmner import PMNERImageProcessor

    paths = []
    for index, colour in enumerate([(200, 30, 30), (20, 180, 220), (90, 90, 10)]):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{index}.png")
        paths.append(str(tmp_path / f"{index}.png"))
    dataset = datasets.Dataset.from_dict({"image_id": ["a", "b", "c"], "image": paths})
    processor = PMNERImageProcessor(detector=None, backbone="resnet18", backbone_weights="random:1", crop_size=32,
                                    max_objects=2)
    first = processor.extract_dataset_features(dataset, cache_dir=tmp_path / "cache", progress=False)
    expected = np.asarray(first["visual_features"])
    cache = processor.feature_cache(tmp_path / "cache")
    (shard,) = cache.shard_files()
    overwrite_features(shard, offset=8)
    again = processor.extract_dataset_features(dataset, cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_allclose(np.asarray(again["visual_features"]), expected, rtol=1e-5, atol=1e-5)
    assert os.path.exists(shard + ".corrupt")
    assert len(cache.load()) == 3  # written again, from the images
    # a shard truncated after the index was saved: found when its rows are read, then computed again
    (shard,) = cache.shard_files()
    with open(shard, "r+b") as handle:
        handle.truncate(os.path.getsize(shard) - 100)
    third = processor.extract_dataset_features(dataset.select([0, 1, 2]), cache_dir=tmp_path / "cache", progress=False,
                                               add_num_detections=True)
    np.testing.assert_allclose(np.asarray(third["visual_features"]), expected, rtol=1e-5, atol=1e-5)
    assert os.path.exists(shard + ".corrupt")


def test_format_1_shards_still_read(tmp_path):
    """A shard written before detection counts were stored (float32, keys in the metadata) reads with -1 counts."""
    from safetensors.torch import save_file

    keys, features, masks, _ = random_entries(3)
    folder = tmp_path / "frr-fp"
    folder.mkdir()
    save_file({"visual_features": features, "visual_mask": masks}, str(folder / "shard-old.safetensors"),
              metadata={"keys": json.dumps(keys), "format_version": "1"})
    cache = FRRFeatureCache(tmp_path, "fp").load()
    got_features, got_masks, got_detections = cache.get_many(keys)
    assert torch.equal(got_features, features) and got_detections.tolist() == [-1, -1, -1]
    assert cache.num_detections_at(cache.positions(keys)).tolist() == [-1, -1, -1]


def compute_from_name(chunk):
    """Features whose value is the key's number: `key-7` -> 7.0 everywhere."""
    values = torch.tensor([float(key.split("-")[-1]) for key in chunk])
    features = values.view(-1, 1, 1).expand(-1, 2, 4).clone()  # (n, 2, 4)
    return chunk, features, torch.ones(len(chunk), 2, dtype=torch.bool), [1] * len(chunk)


def writer(cache_dir, log, start_file, keys, kill_at_shard):
    """A writer process (forked: no imports to wait for). With `kill_at_shard`, it writes half of that shard's
    temporary file, says so and waits to be killed before the rename."""
    from processing_pmner import image_feature_cache as feature_cache

    if kill_at_shard:
        real_save, written = feature_cache.safetensors_save_file, []

        def save(tensors, path, metadata=None):
            real_save(tensors, path, metadata=metadata)
            written.append(path)
            if len(written) == kill_at_shard:
                with open(path, "r+b") as handle:
                    handle.truncate(os.path.getsize(path) // 2)
                open(f"{log}.killme", "w").close()
                time.sleep(60)

        feature_cache.safetensors_save_file = save

    def compute(chunk):
        with open(log, "a") as handle:  # one line per computed key
            handle.write("".join(f"{os.getpid()} {key}\n" for key in chunk))
        time.sleep(0.02)
        return compute_from_name(chunk)

    while not os.path.exists(start_file):  # the writers start together
        time.sleep(0.005)
    FRRFeatureCache(cache_dir, "fp").fill(keys, compute, batch_size=2, shard_size=4, poll_interval=0.02)


def start_writer(tmp_path, keys, name, kill_at_shard=0):
    process = multiprocessing.get_context("fork").Process(
        target=writer, args=(str(tmp_path / "cache"), str(tmp_path / name), str(tmp_path / "go"), keys, kill_at_shard)
    )
    process.start()
    return process


def logged(path) -> list[str]:
    return [line.split()[1] for line in path.read_text().splitlines()] if path.exists() else []


def test_two_concurrent_writers_compute_each_key_once(tmp_path):
    keys = [f"key-{index}" for index in range(40)]
    first = start_writer(tmp_path, keys, "log-a")
    second = start_writer(tmp_path, keys[::-1], "log-b")  # they meet in the middle
    (tmp_path / "go").touch()
    for process in (first, second):
        process.join(timeout=60)
        assert process.exitcode == 0
    computed = logged(tmp_path / "log-a") + logged(tmp_path / "log-b")
    assert sorted(computed) == sorted(keys)  # every key computed exactly once, by one process or the other
    assert logged(tmp_path / "log-a") and logged(tmp_path / "log-b")  # both did share the work
    cache = FRRFeatureCache(tmp_path / "cache", "fp").load()
    features, masks, detections = cache.get_many(keys)
    assert torch.equal(features[:, 0, 0], torch.arange(40, dtype=torch.float32)) and masks.all()
    assert not [name for name in os.listdir(os.path.join(cache.folder, "claims")) if name.endswith(".claim")]


def test_killed_writer_leaves_no_partial_shard_and_the_next_run_completes_it(tmp_path):
    keys = [f"key-{index}" for index in range(12)]
    (tmp_path / "go").touch()
    writer = start_writer(tmp_path, keys, "log-killed", kill_at_shard=2)
    deadline = time.monotonic() + 60
    deadline = time.monotonic() + 30
    while not (tmp_path / "log-killed.killme").exists():
        assert writer.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()  # reaped: its pid is now dead
    assert writer.exitcode == -signal.SIGKILL
    folder = tmp_path / "cache" / "frr-fp"
    temporary = [name for name in os.listdir(folder) if name.startswith(".tmp-")]
    assert len(temporary) == 1  # the half-written shard, never listed as one
    cache = FRRFeatureCache(tmp_path / "cache", "fp").load()
    assert len(cache) == 4 and len(cache.shard_files()) == 1  # only the first, complete shard
    claims = [name for name in os.listdir(folder / "claims") if name.endswith(".claim")]
    assert len(claims) == 4  # the killed writer's claims on the keys of the shard it was writing

    computed = []

    def compute(chunk):
        computed.extend(chunk)
        return compute_from_name(chunk)

    assert cache.fill(keys, compute, batch_size=4) == 8  # the dead writer's claims are taken over
    assert sorted(computed) == sorted(keys[4:])
    assert not [name for name in os.listdir(folder) if name.startswith(".tmp-")]  # its temporary file is gone
    reread = FRRFeatureCache(tmp_path / "cache", "fp").load()
    assert torch.equal(reread.get_many(keys)[0][:, 0, 0], torch.arange(12, dtype=torch.float32))
    assert not [name for name in os.listdir(folder / "claims") if name.endswith(".claim")]


def fake_claim(cache: FRRFeatureCache, key: str, pid: int, host: str | None = None):
    path = cache.claims.path(key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"host": host or socket.gethostname(), "pid": pid, "start": _process_start(pid), "key": key}, handle)


def test_stale_claims_of_dead_processes_are_taken_over_and_live_ones_respected(tmp_path):
    cache = FRRFeatureCache(tmp_path, "fp")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fake_claim(cache, "dead-owner", dead.pid)
        fake_claim(cache, "live-owner", alive.pid)
        fake_claim(cache, "other-host", alive.pid, host="another-machine")
        assert cache.claims.claim("dead-owner")
        assert json.loads(open(cache.claims.path("dead-owner")).read())["pid"] == os.getpid()
        assert not cache.claims.claim("live-owner") and cache.claims.held_by_other("live-owner")
        assert not cache.claims.claim("other-host")  # another host's claim: never taken over without a timeout
        timed = FRRFeatureCache(tmp_path, "fp", claim_timeout=0.0)
        assert timed.claims.claim("other-host")
        cache.claims.release(["dead-owner"])
        assert not os.path.exists(cache.claims.path("dead-owner"))
        # a fill waits for the live owner's key and computes it once its owner is gone without writing it
        calls = []

        def compute(chunk):
            calls.append(list(chunk))
            return chunk, torch.ones(len(chunk), 2, 4), torch.ones(len(chunk), 2, dtype=torch.bool), [0] * len(chunk)

        alive.kill()
        alive.wait()
        assert cache.fill(["live-owner", "fresh"], compute, poll_interval=0.01) == 2
        assert sorted(key for chunk in calls for key in chunk) == ["fresh", "live-owner"]
    finally:
        alive.kill()
        alive.wait()


def test_extract_dataset_features_adds_detection_counts(tmp_path):
    """Detections above the threshold before the whole-image filler, from a detector with known scores."""
    import datasets
    from PIL import Image

    from processing_builders import MeanColour, colour_processor

    class Detector(torch.nn.Module):
        """Three boxes per image; how many score above 0.95 is given by the image's red value (0, 1 or 3)."""

        def forward(self, images):
            outputs = []
            for image in images:
                passing = {0: 0, 100: 1, 200: 3}[round(float(image[0].mean()) * 255, -2)]
                scores = torch.tensor([0.99] * passing + [0.5] * (3 - passing))
                boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 16.0, 12.0], [1.0, 2.0, 20.0, 20.0]])
                outputs.append({"boxes": boxes, "scores": scores})
            return outputs

    paths = []
    for red in (0, 100, 200):
        paths.append(str(tmp_path / f"red{red}.png"))
        Image.new("RGB", (24, 24), (red, 50, 50)).save(paths[-1])
    dataset = datasets.Dataset.from_dict({"image_id": ["a", "b", "c", "a", "none"],
                                          "image": paths + [paths[0], None]})
    processor = colour_processor(detector="fasterrcnn_mobilenet_v3_large_320_fpn", max_objects=3)
    processor.set_modules(backbone=MeanColour(), feature_dim=3, detector=Detector())
    result = processor.extract_dataset_features(dataset, cache_dir=tmp_path / "cache", progress=False,
                                                cache_dtype="float16", add_num_detections=True)
    assert result["visual_num_detections"] == [0, 1, 3, 0, 0]
    masks = np.asarray(result["visual_mask"])
    assert masks.sum(1).tolist() == [1, 2, 3, 1, 0]  # the whole image fills in after fewer than 3 detections
    assert os.listdir(tmp_path / "cache")[0].endswith("-fp16")
    again = colour_processor(detector="fasterrcnn_mobilenet_v3_large_320_fpn", max_objects=3)
    again.set_modules(backbone=MeanColour(), feature_dim=3, detector=Detector())
    second = again.extract_dataset_features(dataset, cache_dir=tmp_path / "cache", progress=False, cache_dtype="float16",
                                    add_num_detections=True)
    assert again._backbone_module.crops_seen == 0 and second["visual_num_detections"] == [0, 1, 3, 0, 0]
