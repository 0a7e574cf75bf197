"""bench/results/README.md is a reference: each topic names, for its figures, the files that hold
them, the command that reproduces them, the machine and the date; every committed result is
named somewhere; superseded runs sit in the History table with the same four facts."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MACHINE = re.compile(r"AMD EPYC, 2 cores|NVIDIA H100 80GB")
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
COMMAND = re.compile(r"```bash\n|`(?:make [\w-]+|infmllm-[\w-]+[^`]*|python -m [\w.]+[^`]*)`")


def sections() -> dict[str, str]:
    text = (RESULTS / "README.md").read_text()
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def named_files(text: str) -> set[str]:
    """Result files a text names: ``name.*`` (every suffix of that stem), ``name.ext`` or ``dir/name.*``."""
    out = set()
    for stem, ext in re.findall(r"`((?:[\w]+/)?[\w]+)\.(\*|json|md|png|log|yaml)`", text):
        out |= {p.relative_to(RESULTS).as_posix() for p in RESULTS.glob(f"{stem}.{ext}")}
    return out


def tracked_results() -> set[str]:
    files = subprocess.run(
        ["git", "ls-files", "bench/results"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return {f[len("bench/results/") :] for f in files} - {"README.md"}


def test_every_topic_names_its_files_command_machine_and_date():
    topics = {name: body for name, body in sections().items() if name != "History"}
    assert len(topics) >= 6
    for name, body in topics.items():
        assert named_files(body), f"section {name!r} names no result file that exists"
        assert COMMAND.search(body), f"section {name!r} gives no command"
        assert MACHINE.search(body), f"section {name!r} names no machine"
        assert DATE.search(body), f"section {name!r} gives no date"


def test_every_history_row_names_file_command_machine_and_date():
    rows = [line for line in sections()["History"].splitlines() if line.startswith("| `")]
    assert rows
    for row in rows:
        file, when, command = (cell.strip() for cell in row.strip("|").split("|")[:3])
        assert named_files(file) and MACHINE.search(when) and DATE.search(when) and COMMAND.search(command), row


def test_every_committed_result_is_named_and_every_named_file_exists():
    text = (RESULTS / "README.md").read_text()
    named = named_files(text)
    for seed_range in re.findall(r"`(\w+?)(\d)\.\*` \.\. `\w+?(\d)\.\*`", text):  # needle_seed0.* .. needle_seed5.*
        stem, first, last = seed_range
        named |= {
            p.relative_to(RESULTS).as_posix()
            for i in range(int(first), int(last) + 1)
            for p in RESULTS.glob(f"{stem}{i}.*")
        }
    missing = (
        tracked_results()
        - named
        - {f for f in tracked_results() if f.startswith("drive_60min/") and "`drive_60min/report.*`" in text}
    )
    assert not missing, f"results no section names: {sorted(missing)}"
    mentioned = set(re.findall(r"`([\w/]+\.(?:json|md|png|log))`", text))
    assert all((RESULTS / m).exists() for m in mentioned if "/" not in m or m.startswith("drive_60min/")), mentioned


def test_nothing_in_the_repository_speaks_of_sessions_issues_or_lent_machines():
    hits = subprocess.run(
        [
            "git",
            "grep",
            "-niE",
            r"(first|second|third|fourth|fifth|sixth|seventh|eighth) session|"
            r"issue [0-9]|[l]ent ",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout
    assert hits == "", hits
