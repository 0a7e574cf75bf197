"""Shared benchmark plumbing: machine description, JSON results, markdown tables."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch


def machine() -> dict:
    """Where a benchmark ran: CPU model, cores, memory (GiB), torch version and threads."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def describe(host: dict) -> str:
    """One line naming the machine of :func:`machine` (GPU included when a run had one)."""
    parts = [host["cpu"], f"{host['cores']} cores"]
    if host.get("memory_gib"):
        parts.append(f"{host['memory_gib']} GiB")
    if host.get("gpu"):
        parts.append(f"GPU {host['gpu']}")
    if host.get("torch"):
        parts.append(f"torch {host['torch']}")
    return "Machine: " + ", ".join(parts) + "."


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What a timer calls before reading the clock so that ``device``'s queued work is counted:
    ``torch.cuda.synchronize`` on a GPU, nothing on a CPU."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def check_device(name: str) -> torch.device:
    """The torch device called ``name`` ("cpu", "cuda", "cuda:1"), checked before any model loads.

    Raises:
        ValueError: a name torch does not know, or a CUDA device this machine does not have.
    """
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown torch device {name!r}: {exc}") from exc
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: only cpu and cuda are supported")
    return dev


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)


def write_report(path: str | Path, data: dict, markdown: str) -> None:
    """Write ``data`` to ``path`` (JSON) and ``markdown`` beside it (``.md``), and print the markdown."""
    write_json(path, data)
    Path(path).with_suffix(".md").write_text(markdown)
    print(markdown)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats printed with 3 significant digits, None as n/a."""

    def fmt(x):
        if x is None:
            return "n/a"
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.0f}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


@contextmanager
def png_figure(path: str | Path, **subplots):
    """Yield ``(fig, axes)`` from ``matplotlib.pyplot.subplots(**subplots)`` on the Agg backend
    (no display needed); on exit lay out, save as PNG at ``path`` (110 dpi) and close."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
