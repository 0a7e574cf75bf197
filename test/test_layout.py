"""The README's "Layout" section names every folder of the repository and of the package, and
nothing that is not there: compared with the files git tracks."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layout_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Layout") :].split("```")[1]
    return [line for line in block.splitlines() if line.strip()]


def listed(indent: str) -> set[str]:
    """Folders named at the start of the block's lines with exactly ``indent`` leading spaces
    (``name/`` or ``name/sub/``; the first component)."""
    names = set()
    for line in layout_block():
        if line.startswith(indent) and not line[len(indent)].isspace():
            head = re.split(r"\s{2,}", line.strip())[0]
            names |= {m.split("/")[0] for m in re.findall(r"([\w.]+(?:/[\w.]+)*)/", head)}
    return names


def tracked_folders(under: str = "") -> set[str]:
    files = subprocess.run(
        ["git", "ls-files", *([under] if under else [])], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return {f[len(under) :].split("/")[0] for f in files if "/" in f[len(under) :]}


def test_readme_layout_names_every_top_level_folder_and_no_other():
    assert listed("") == tracked_folders() - {".ci"}


def test_readme_layout_names_every_package_folder_and_no_other():
    assert listed("  ") == tracked_folders("infmllm_ros/")


def named_modules() -> dict[str, set[str]]:
    """Per package folder of the block, the ``*.py`` names its entry mentions."""
    out: dict[str, set[str]] = {}
    folder = None
    for line in layout_block():
        if not line.startswith(" "):
            folder = None  # a top-level folder's line ends the package's entries
        elif head := re.match(r"  (\w+)/\s", line):
            folder = head.group(1)
        if folder:
            out.setdefault(folder, set()).update(re.findall(r"\b(\w+\.py)\b", line))
    return out


def test_readme_layout_names_every_module_of_each_package_folder_and_no_other():
    names = named_modules()
    assert set(names) == tracked_folders("infmllm_ros/")
    for folder, mentioned in names.items():
        files = {
            f.split("/")[-1]
            for f in subprocess.run(
                ["git", "ls-files", f"infmllm_ros/{folder}/"], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.split()
        }
        assert mentioned == {f for f in files if f.endswith(".py")} - {"__init__.py"}, folder
