"""The install resolves on its own: pyproject.toml's ranges, without scripts/constraints.txt, in a
fresh virtual environment (pip's dry run: the resolution, nothing installed); and the pins that
CI installs with lie inside those ranges."""

import json
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def requirements() -> list[Requirement]:
    """Every requirement of the package and of its extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += extra
    return [Requirement(x) for x in lines]


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "scripts" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version
    return out


def test_the_pins_satisfy_the_ranges():
    """Every pinned version is one the declared ranges allow (else CI tests a set no user gets)."""
    pinned = pins()
    checked = 0
    for req in requirements():
        version = pinned.get(canonicalize_name(req.name))
        if version is not None:
            assert req.specifier.contains(version, prereleases=True), (
                f"scripts/constraints.txt pins {req.name}=={version} outside pyproject.toml's {req}"
            )
            checked += 1
    assert checked >= 10  # the S3 stack, torch, the test tools: the pins do name them


_OFFLINE = (
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Could not fetch URL",
    "ConnectTimeoutError",
)
"""pip's words for an index it cannot reach (a conflict reads ResolutionImpossible instead)."""


def _pip(venv: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    # Without PIP_CONSTRAINT: the point is resolving without constraints.
    env = {
        k: v for k, v in os.environ.items() if k not in ("PIP_CONSTRAINT", "PIP_REQUIRE_VIRTUALENV")
    }
    return subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=venv,
    )


@pytest.mark.slow
def test_a_fresh_venv_resolves_the_test_extra_without_constraints(tmp_path):
    """`pip install -e '.[test]'` without constraints ended in ResolutionImpossible (the newest
    boto3 and the newest aiobotocore share no botocore). As scripts/setup.sh does, torch goes in
    first (TORCH_SPEC, default this suite's version; --no-deps: its dependencies are resolved
    with the rest): a plain `torch` would be a multi-GB CUDA build, and the question is the other
    ranges. Then the venv's own pip, the one `python -m venv` ships, resolves the rest as a
    user's would (a dry run: nothing more is installed)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=600)
    probe = _pip(
        venv, "download", "--no-deps", "--dest", str(tmp_path / "probe"), "six", timeout=300
    )
    if probe.returncode != 0:
        tail = (probe.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"the package index is unreachable from here: {tail}")
    torch_spec = os.environ.get("TORCH_SPEC", f"torch=={metadata.version('torch').split('+')[0]}")
    torch = _pip(venv, "install", "--no-deps", torch_spec, timeout=1800)
    assert torch.returncode == 0, torch.stderr[-3000:]
    report = tmp_path / "report.json"
    # Editable, as the README installs it (its metadata lands in the git-ignored *.egg-info).
    proc = _pip(
        venv, "install", "--dry-run", "--report", str(report), "-e", f"{ROOT}[test]", timeout=2400
    )
    offline = any(m in proc.stderr for m in _OFFLINE) and "ResolutionImpossible" not in proc.stderr
    if proc.returncode != 0 and offline:
        pytest.skip(f"the package index went unreachable: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    chosen = {
        canonicalize_name(x["metadata"]["name"]): x["metadata"]["version"]
        for x in json.loads(report.read_text())["install"]
    }
    assert "torch" not in chosen, f"the resolution replaces the installed torch: {chosen['torch']}"
    for req in requirements():
        name = canonicalize_name(req.name)
        if name in chosen and not req.marker:
            assert req.specifier.contains(chosen[name], prereleases=True), (req, chosen[name])
    for name in ("s3fs", "aiobotocore", "botocore", "boto3", "moto", "pytest", "transformers"):
        assert name in chosen, f"{name} missing from the resolution: {sorted(chosen)}"
