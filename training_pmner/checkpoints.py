"""Checkpoints that survive crashes: what `train_pmner.py` resumes from is checked first (weights readable, config
and trainer state parseable, optimizer / scheduler / RNG state files complete), a broken latest checkpoint gives way
to the newest intact one, and a checkpoint left half-written by a crash is set aside so that nothing takes it for a
complete one. Nothing here unpickles: `.pt` / `.pth` files are checked as the zip archives torch writes."""

import json
import os
import re
import struct
import zipfile


CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
INCOMPLETE_SUFFIX = ".incomplete"
REQUIRED = ("config.json", "trainer_state.json", "model.safetensors")  # trainer_state.json is written last


def _safetensors_problem(path: str) -> str | None:
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return "truncated"
        header_size = struct.unpack("<Q", head)[0]
        if 8 + header_size > size:
            return "truncated"
        try:
            header = json.loads(handle.read(header_size))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return "not a safetensors file"
    return None if 8 + header_size + end == size else "truncated"


def _zip_problem(path: str) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every member and checks its CRC
    except (zipfile.BadZipFile, OSError, EOFError):
        return "truncated or not a torch file"
    return None if bad is None else f"damaged ({bad})"


def checkpoint_problems(folder: str) -> list[str]:
    """What is wrong with a checkpoint folder (`[]` for an intact one), each naming the file."""
    problems = []
    for name in REQUIRED:
        if not os.path.isfile(os.path.join(folder, name)):
            problems.append(f"{name} is missing")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        problem = None
        if name.endswith(".json"):
            try:
                with open(path, encoding="utf-8") as handle:
                    json.load(handle)
            except (ValueError, UnicodeDecodeError):
                problem = "not valid JSON (truncated?)"
        elif name.endswith(".safetensors"):
            problem = _safetensors_problem(path)
        elif name.endswith((".pt", ".pth", ".bin")):
            problem = _zip_problem(path)
        if problem:
            problems.append(f"{name} is {problem}")
    return problems


def checkpoints_newest_first(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    found = [(int(match.group(1)), name) for name in os.listdir(output_dir) if (match := CHECKPOINT.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)
            if os.path.isdir(os.path.join(output_dir, name))]


def intact_checkpoint(output_dir: str, warn) -> str | None:
    """The newest intact checkpoint of `output_dir` (`None` when it has none at all); broken newer ones are named
    through `warn`. Raises `ValueError` naming the files when every checkpoint is broken."""
    broken = []
    for folder in checkpoints_newest_first(output_dir):
        problems = checkpoint_problems(folder)
        if not problems:
            if broken:
                warn(
                    f"skipping broken checkpoint(s) {'; '.join(broken)}: resuming from {folder}, the newest intact one"
                )
            return folder
        broken.append(f"{folder} ({', '.join(problems)})")
    if broken:
        raise ValueError(
            f"no intact checkpoint to resume from: {'; '.join(broken)}. Delete them to start afresh, or pass another "
            "--output_dir"
        )
    return None


def saved_image_processor(folder: str) -> dict | None:
    """The image processor's settings saved in a checkpoint or model folder (`processor_config.json`'s
    `image_processor`, else `preprocessor_config.json`); `None` when it holds neither."""
    for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                saved = json.load(handle)
            saved = saved.get(key) if key else saved
            if isinstance(saved, dict):
                return saved
    return None


def check_checkpoint(folder: str) -> None:
    """`--resume_from_checkpoint FOLDER`: raises `ValueError` naming what is broken (never another checkpoint)."""
    if not os.path.isdir(folder):
        raise ValueError(f"--resume_from_checkpoint {folder}: no such checkpoint folder")
    problems = checkpoint_problems(folder)
    if problems:
        raise ValueError(f"--resume_from_checkpoint {folder} is broken: {', '.join(problems)}")


def set_aside_broken(output_dir: str) -> list[str]:
    """After a failed save: renames checkpoint folders that are not intact to `<name>.incomplete`, so that no
    resume takes them for complete ones; returns their new paths."""
    moved = []
    for folder in checkpoints_newest_first(output_dir):
        if checkpoint_problems(folder):
            target = folder + INCOMPLETE_SUFFIX
            if not os.path.exists(target):
                try:
                    os.replace(folder, target)
                except FileNotFoundError:  # another process of the run set it aside first
                    continue
                moved.append(target)
    return moved
