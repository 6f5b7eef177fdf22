"""Gather, here, the wheels the lent GPU machine lacks, into `.whl/` (ignored by git).

    python tests/gpu/wheels.py            # download (PyPI) and build (deepspeed) into .whl/
    python tests/gpu/wheels.py --check    # only check what is there: size, dependencies

The GPU machine (tests/gpu/README.md) has Python 3.12, PyTorch, transformers, peft, accelerate
and the usual scientific stack, and no network. What tuner's local backend and a trial need
beyond that travels as wheels with the source tree, at most `LIMIT_MIB` together. Ray does not
travel (it is ~70 MB): the local backend and the trial run without it.

Versions are those of constraints.txt (the ones the tests pass with) wherever it names the
package; transformers, peft and huggingface-hub travel too so that the trial runs on the
versions it is tested with, not the image's. Every wheel's own requirements are checked against
the wheels here and the image's package list (`ON_THE_MACHINE`), so that a missing dependency
shows here rather than as an ImportError in the 15 minutes of a lease.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / ".whl"
LIMIT_MIB = 60  # the lease carries 64 MiB: the wheels and the source tree together
PYTHON = "3.12"  # the GPU image's python3
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]

# What travels: each with why. A version from constraints.txt unless pinned here.
CARRY = {
    "optuna": "the study",
    "alembic": "optuna's RDB storage",
    "mako": "alembic",
    "colorlog": "optuna",
    "sqlalchemy": "optuna's RDB storage",
    "greenlet": "sqlalchemy",
    "trl": "the trial's SFTTrainer",
    "datasets": "the trial's data",
    "dill": "datasets",
    "multiprocess": "datasets",
    "transformers": "the tested version (the image's is 5.17; 5.24 takes its hub 1.33)",
    "peft": "the tested version",
    "pydantic": "trial and space models",
    "pydantic-core": "pydantic",
    "pydantic-settings": "tuner.common.settings",
    "python-dotenv": "pydantic-settings",
    "annotated-types": "pydantic",
    "typing-inspection": "pydantic",
    "typing-extensions": "pydantic's floor",
    "typer": "tuner.face.cli (the workers' entry point imports it)",
    "liger-kernel": "use_liger_kernel (not in constraints.txt: newest)",
    "hjson": "deepspeed",
}
# Core requirements that stay behind: the check never imports them.
LEFT_BEHIND = {"plotly": "`tuner report` only (9.7 MB)"}
BUILT = {"deepspeed": "ZeRO-2/3 trials; sdist only, built here without its ops (they JIT there)"}
# 41 MiB: with transformers it does not fit; the check then reports QLoRA as not run.
OPTIONAL = {"bitsandbytes": "QLoRA, if it fits the limit"}

# The GPU image's packages (device/KINDS.md, read 2026-11-17), normalised: a requirement met here
# is not carried.
ON_THE_MACHINE = set(
    """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer click cloudpickle cmake colorama contourpy
    coverage cycler cython einops filelock fonttools frozenlist fsspec h11 h5py hf-xet httpcore
    httpx huggingface-hub idna jinja2 joblib markdown markdown-it-py markupsafe mdurl msgpack
    multidict narwhals networkx ninja numpy nvidia-ml-py packaging pandas pillow pip pluggy
    protobuf psutil pyarrow py-cpuinfo pygments pyparsing python-dateutil pytorch-lightning
    pyyaml regex requests rich safetensors scipy sentencepiece setuptools shellingham six sympy
    tokenizers torch tqdm transformers triton typer typing-extensions urllib3 wheel xxhash yarl
    zipp peft
    """.split()  # noqa: SIM905 - the list as KINDS.md gives it
)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split(";")[0].strip().split("==")
            pins[_norm(name)] = version.strip()
    return pins


def download(names: list[str], pins: dict[str, str]) -> None:
    specs = [f"{n}=={pins[_norm(n)]}" if _norm(n) in pins else n for n in names]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
         "--python-version", PYTHON, "--implementation", "cp", *platforms, "-d", str(WHEELS),
         *specs],
        check=True,
    )  # fmt: skip


def build_deepspeed(pins: dict[str, str]) -> None:
    """DeepSpeed ships an sdist only. Its setup.py imports torch, so it is built against the
    torch already here (no build isolation, which would pull a CUDA torch); with no op prebuilt
    (DS_BUILD_OPS=0) the wheel is pure Python and its ops compile on first use there."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DS_BUILD_OPS": "0"}
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
             "--no-binary", "deepspeed", "-w", tmp, f"deepspeed=={pins['deepspeed']}"],
            check=True, env=env,
        )  # fmt: skip
        for wheel in Path(tmp).glob("deepspeed-*.whl"):
            shutil.copy(wheel, WHEELS / wheel.name)


def requirements(wheel: Path) -> list[str]:
    """The wheel's unconditional requirements (extras and other platforms' left out)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    names = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        spec = line.removeprefix("Requires-Dist:").strip()
        marker = spec.split(";", 1)[1] if ";" in spec else ""
        if "extra ==" in marker or 'sys_platform == "win32"' in marker:
            continue
        if (
            'python_version < "3.1' in marker
            or "platform_machine" in marker
            and "x86_64" not in marker
        ):
            continue
        names.append(_norm(re.split(r"[\s<>=!~\[;(]", spec, maxsplit=1)[0]))
    return names


def check() -> int:
    wheels = sorted(WHEELS.glob("*.whl"))
    here = {_norm(w.name.split("-")[0]) for w in wheels}
    problems = []
    for name in ("torch", "ray"):
        if name in here:
            problems.append(f"{name} must not travel")
    for wheel in wheels:
        for need in requirements(wheel):
            if need not in here and need not in ON_THE_MACHINE:
                problems.append(f"{wheel.name} needs {need}, which is neither here nor there")
    names = [w.name.split("-")[0] for w in wheels]
    for name in names:
        if names.count(name) > 1:
            problems.append(f"two versions of {name}: pip would stop the whole install")
    size = sum(w.stat().st_size for w in wheels)
    tree = _tree_size()
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB; source tree {tree / 2**20:.1f} MiB; "
          f"together {(size + tree) / 2**20:.1f} MiB of {LIMIT_MIB} MiB")  # fmt: skip
    if size + tree > LIMIT_MIB * 2**20:
        problems.append(f"over the {LIMIT_MIB} MiB limit")
    for line in sorted(set(problems)):
        print(f"problem: {line}")
    return 1 if problems else 0


def _tree_size() -> int:
    """What else travels: the files git tracks or would track (untracked, not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.split(b"\0")  # fmt: skip
    return sum(
        (ROOT / p.decode()).stat().st_size for p in listed if p and (ROOT / p.decode()).is_file()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check .whl/ as it is")
    parser.add_argument("--no-optional", action="store_true", help="leave bitsandbytes out")
    args = parser.parse_args()
    if not args.check:
        WHEELS.mkdir(exist_ok=True)
        pins = constraints()
        download(list(CARRY), pins)
        build_deepspeed(pins)
        if not args.no_optional:
            download(list(OPTIONAL), pins)
            size = sum(w.stat().st_size for w in WHEELS.glob("*.whl")) + _tree_size()
            if size > LIMIT_MIB * 2**20:
                for wheel in WHEELS.glob("bitsandbytes-*.whl"):
                    print(f"{wheel.name} ({wheel.stat().st_size / 2**20:.0f} MiB) does not fit: "
                          "left out, QLoRA is reported as not run")  # fmt: skip
                    wheel.unlink()
    sys.exit(check())


if __name__ == "__main__":
    main()
