"""The frame: pinned requirements resolve, and the packages import without a model hub."""

import pathlib
import re
from importlib import metadata

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _pins(name):
    """`name`'s exact pins, following its `-r FILE` includes (whose own lines must be pinned too)."""
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            pins.update(_pins(line[3:].strip()))
        elif line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]+\])?==([^\s;]+)", line)
            assert match, f"{name}: requirement {line!r} is not pinned exactly (name==version)"
            pins[match.group(1)] = match.group(3)
    return pins


def test_every_requirement_is_pinned_and_installed_at_its_pin():
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-nodeps.txt"):
        for package, version in _pins(name).items():
            installed = metadata.version(package)
            assert installed.split("+")[0] == version, f"{name}: {package} is {installed}, pinned {version}"


def test_tests_see_eight_cpu_devices():
    import jax

    assert jax.default_backend() == "cpu"
    assert jax.device_count() == 8
