"""requirements.txt installs on every platform PyTorch has wheels for: each line's environment marker, read with
`packaging` as pip reads it."""
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PLATFORMS = {  # (sys_platform, platform_machine) as Python reports them there
    "linux x86_64": ("linux", "x86_64"), "linux aarch64": ("linux", "aarch64"), "macOS arm64": ("darwin", "arm64"),
    "macOS x86_64": ("darwin", "x86_64"), "Windows x86_64": ("win32", "AMD64"), "Windows arm64": ("win32", "ARM64")}


def installed_on(platform):
    sys_platform, machine = PLATFORMS[platform]
    env = {"sys_platform": sys_platform, "platform_machine": machine}
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [Requirement(line) for line in lines if line]
    return {r.name for r in reqs if r.marker is None or r.marker.evaluate(env)}, {r.name for r in reqs}


def test_each_platform_gets_the_lines_that_have_wheels_there():
    for platform in PLATFORMS:
        got, every = installed_on(platform)
        dali = platform.startswith("linux")  # DALI: Linux x86_64 and aarch64 wheels only
        codec = platform in ("linux x86_64", "linux aarch64", "macOS arm64", "Windows x86_64")  # TorchCodec's wheels
        assert ("nvidia-dali-cuda130" in got) == dali, platform
        assert ("torchcodec" in got) == codec, platform
        assert "pillow-heif" in got, platform  # HEIC photos: wheels everywhere
        left_out = {name for name, kept in (("nvidia-dali-cuda130", dali), ("torchcodec", codec)) if not kept}
        assert got == every - left_out, platform  # every other line everywhere
