"""No Docker engine runs here: check what the Dockerfiles promise against the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "Dockerfile.tpu"]


def _extras(line: str) -> set[str]:
    """Extras of the package install in a pip line: `.[a,b]` or `-e ".[a]"` -> {a, b}; `.` -> set()."""
    match = re.search(r"""(?:^|\s)["']?\.(?:\[([^\]]*)\])?["']?(?:\s|$)""", line)
    assert match, f"no package install in: {line}"
    return {e.strip() for e in (match.group(1) or "").split(",") if e.strip()}


def _readme_quickstart_install() -> str:
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)\n```", readme, re.S)
    assert first, "README starts with a bash block"
    return first.group(1)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_the_package_as_the_readme_does(dockerfile: Path) -> None:
    text = dockerfile.read_text().replace("\\\n", " ")
    installs = [line for line in text.splitlines() if line.startswith("RUN") and re.search(r"pip install[^\n]* \.(\s|$)", line)]
    assert len(installs) == 1, installs
    assert _extras(installs[0]) == _extras(_readme_quickstart_install().split("pip install", 1)[1])
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):  # everything it copies exists
        for name in source.split():
            assert (ROOT / name).exists(), f"{dockerfile.name} copies missing {name}"
    assert 'ENTRYPOINT ["python", "-m", "gs_lightning"]' in text
    for config in re.findall(r"configs/[\w/]+\.yaml", text):  # the configs its usage lines name
        assert (ROOT / config).is_file(), f"{dockerfile.name} names missing {config}"


def test_the_tpu_image_pins_torch_xla_to_its_torch() -> None:
    text = (ROOT / "Dockerfile.tpu").read_text()
    assert re.search(r'"torch==\$\{TORCH_VERSION\}"', text) and re.search(r'"torch_xla\[tpu\]==\$\{TORCH_VERSION\}"', text)
