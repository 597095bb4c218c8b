"""The wheels that benchmarks/gpu_check.sh carries to a GPU machine without network: `--prepare-wheels` (here, with
the registry) and `--install-wheels` (there, offline) of benchmarks/gpu_check.py; see its docstring."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys


PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_WHEELS = os.path.join(PROJECT, "benchmarks", "gpu_wheels")
GPU_PROVIDED = ("torch", "torchvision", "transformers", "safetensors", "tokenizers", "pyyaml", "huggingface-hub")
WHEELS_LIMIT = 64 * 2**20


class UsageError(Exception):
    """One line; exit status 2."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements() -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    with open(os.path.join(PROJECT, "pyproject.toml"), "rb") as handle:
        return tomllib.load(handle)["project"]["dependencies"]


def is_pure(distribution) -> bool:
    """Whether an installed distribution is pure Python (its wheel's Root-Is-Purelib, no compiled file)."""
    wheel = distribution.read_text("WHEEL") or ""
    if "Root-Is-Purelib: true" not in wheel:
        return False
    return not any(str(path).endswith((".so", ".pyd", ".dylib")) for path in distribution.files or [])


def wheel_plan(python_version: str = "3.12") -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(pure, compiled): the (name, version) installed here of the project's dependencies and their requirements
    (markers evaluated for `python_version` on Linux), the GPU machine's own packages and their requirements left out."""
    from packaging.requirements import Requirement

    environment = {"python_version": python_version, "sys_platform": "linux", "platform_system": "Linux", "extra": ""}
    queue = list(project_requirements())
    seen, pure, compiled = set(), [], []
    while queue:
        requirement = Requirement(queue.pop(0))
        name = canonical(requirement.name)
        if name in seen or name in GPU_PROVIDED:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        seen.add(name)
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise UsageError(f"--prepare-wheels: {name} (needed by the project) is not installed here; pip install -e . first")
        (pure if is_pure(distribution) else compiled).append((name, distribution.version))
        queue.extend(distribution.requires or [])
    return sorted(pure), sorted(compiled)


def pip(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", *arguments, "--disable-pip-version-check", "--quiet"],
        capture_output=True, text=True,
    )


def prepare_wheels(folder: str, python_version: str) -> int:
    """Downloads (or builds) a wheel of each pure-Python package of `wheel_plan` into `folder`."""
    pure, compiled = wheel_plan(python_version)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.endswith(".whl"):
                os.remove(os.path.join(folder, name))  # one version of each package
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".gitignore"), "w") as handle:
        handle.write("# wheels for benchmarks/gpu_check.sh, made by --prepare-wheels: never committed\n*\n")
    carried = []
    for name, version in pure:
        before = set(os.listdir(folder))
        completed = pip(
            "download", "--no-deps", "--only-binary", ":all:", "--python-version", python_version,
            "--implementation", "py", "--abi", "none", "--platform", "any", "--dest", folder, f"{name}=={version}",
        )
        if completed.returncode != 0:  # published as a source archive only: build the wheel here
            completed = pip("wheel", "--no-deps", "--wheel-dir", folder, f"{name}=={version}")
        new = sorted(set(os.listdir(folder)) - before - {".gitignore"})
        if completed.returncode != 0 or len(new) != 1:
            lines = [line for line in (completed.stderr + completed.stdout).splitlines() if line.strip()]
            raise UsageError(f"--prepare-wheels: no wheel of {name}=={version}: {lines[-1] if lines else new}")
        size = os.path.getsize(os.path.join(folder, new[0]))
        carried.append({"name": name, "version": version, "file": new[0], "bytes": size})
    manifest = {
        "python_version": python_version,
        "wheels": carried,
        "not_carried": [{"name": name, "version_here": version} for name, version in compiled],
        "gpu_provided": list(GPU_PROVIDED),
    }
    with open(os.path.join(folder, "manifest.json"), "w") as handle:
        json.dump(manifest, handle, indent=2)
    total = sum(wheel["bytes"] for wheel in carried)
    print("| package | version | wheel | KiB |")
    print("|---|---|---|---:|")
    for wheel in carried:
        print(f"| {wheel['name']} | {wheel['version']} | {wheel['file']} | {wheel['bytes'] / 1024:.0f} |")
    print(f"\n{len(carried)} wheels, {total / 2**20:.2f} MiB in all, in {folder}")
    print("not carried (compiled; expected on the GPU machine): " + ", ".join(f"{n} ({v} here)" for n, v in compiled))
    if total > WHEELS_LIMIT:
        raise UsageError(f"--prepare-wheels: the wheels take {total / 2**20:.1f} MiB, over the 64 MiB that travel")
    return 0


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def unmet(requirement_text: str) -> str | None:
    """Why a pyproject requirement is not met here (None when it is)."""
    from packaging.requirements import Requirement

    requirement = Requirement(requirement_text)
    version = installed_version(requirement.name)
    if version is None:
        return f"{requirement.name} is not installed"
    if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
        return f"{requirement.name} {version} does not meet {requirement}"
    return None


def unmet_requirements(names) -> list[tuple[str, str, str | None]]:
    """(distribution, requirement, installed version or None) for each requirement of the installed distributions
    `names` that the installed packages do not meet (markers evaluated here, extras left out)."""
    from packaging.requirements import Requirement

    problems = []
    for name in names:
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            version = installed_version(requirement.name)
            if version is None or not requirement.specifier.contains(version, prereleases=True):
                problems.append((name, str(requirement), version))
    return problems


def install_wheels(folder: str, site: str) -> int:
    """Installs into `site`, offline, the carried wheels that are needed: a package that is missing, whose version
    does not meet pyproject.toml, or that a carried or project package requires at another version; then every
    dependency of pyproject.toml must be met (with `site` on the path)."""
    from packaging.requirements import Requirement

    manifest_path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise UsageError(f"--install-wheels: {manifest_path} is missing: run `bash benchmarks/gpu_check.sh "
                         f"--prepare-wheels` where the registry is reachable, and carry {folder}")
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    wheels = {}
    for wheel in manifest["wheels"]:
        path = os.path.join(folder, wheel["file"])
        if not os.path.isfile(path):
            raise UsageError(f"--install-wheels: {path} (listed in {manifest_path}) is missing")
        wheels[canonical(wheel["name"])] = path
    project = [canonical(Requirement(text).name) for text in project_requirements()]
    closure = sorted(set(project) | set(wheels) | {canonical(entry["name"]) for entry in manifest["not_carried"]})
    installed = []
    needed = [name for name in wheels if installed_version(name) is None]
    needed += [canonical(Requirement(text).name) for text in project_requirements()
               if unmet(text) and canonical(Requirement(text).name) in wheels]
    for _ in range(4):  # a package installed may require another carried one at another version
        needed = sorted(set(needed) - set(installed))
        if not needed:
            break
        os.makedirs(site, exist_ok=True)
        completed = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
             "--upgrade", "--quiet", "--disable-pip-version-check", "--target", site, *(wheels[n] for n in needed)],
            capture_output=True, text=True,
        )
        if completed.returncode != 0:
            raise UsageError(f"--install-wheels: pip install failed: {(completed.stderr or completed.stdout).strip()[-500:]}")
        installed += needed
        if site not in sys.path:
            sys.path.insert(0, site)
        importlib.invalidate_caches()
        needed = [canonical(Requirement(requirement).name) for _, requirement, _ in unmet_requirements(closure)
                  if canonical(Requirement(requirement).name) in wheels]
    print(f"installed {len(installed)} of {len(wheels)} carried wheels into {site}: "
          + (", ".join(os.path.basename(wheels[name]) for name in sorted(installed)) or "none needed"))
    for name, requirement, version in unmet_requirements(closure):
        print(f"warning: {name} requires {requirement}, installed: {version or 'none'}", file=sys.stderr)
    problems = [problem for problem in map(unmet, project_requirements()) if problem]
    for entry in manifest["not_carried"]:
        if installed_version(entry["name"]) is None and canonical(entry["name"]) not in project:
            problems.append(f"{entry['name']} is not installed (compiled: not carried)")
    if problems:
        raise UsageError("--install-wheels: the project cannot run here: " + "; ".join(problems))
    return 0

