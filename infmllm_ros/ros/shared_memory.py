"""Fast DDS's shared-memory transport: how large a segment a profile asks for, and whether this
process got one.

Raw camera frames of more than a few hundred KiB only cross between processes reliably over
shared memory: over UDP a 4K frame is ~400-500 fragments of 64 KiB, and a best-effort reader
loses the whole frame when it misses one (bench/results/README.md, "Limits as shipped"). Each
Fast DDS participant (one per ROS process) allocates its own segment in ``/dev/shm`` at start;
when that fails (a container's default ``/dev/shm`` is 64 MB) Fast DDS logs an error once and
goes on over UDP only, and large frames silently stop arriving.

Only a writer needs a segment as large as its messages; a reader needs the transport and a
port queue for the fragments' descriptors. So the node's profiles ask for a small segment
(its largest message is ``~/memory_image``) and a raw 4K camera driver's for 64 MiB
(``config/fastdds_shm_camera.xml``).
"""

from __future__ import annotations

import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

FASTDDS = "{http://www.eprosima.com}"
#: A Fast DDS shared-memory segment's file in /dev/shm (ports are ``fastdds_port<N>``).
SEGMENT_FILE = re.compile(r"/dev/shm/fastdds_[0-9a-f]{16}$")
MIB = 1 << 20


def segment_sizes(profile: Path) -> list[int]:
    """The ``segment_size`` (bytes) of each SHM transport in a Fast DDS XML ``profile``.

    Raises:
        OSError: ``profile`` cannot be read. xml.etree.ElementTree.ParseError: not XML.
    """
    return [
        int(t.findtext(f"{FASTDDS}segment_size") or 0)
        for t in ET.parse(profile).getroot().iter(f"{FASTDDS}transport_descriptor")
        if t.findtext(f"{FASTDDS}type") == "SHM"
    ]


def with_segment_size(profile: Path, size: int, out: Path) -> Path:
    """Write ``profile`` with every SHM transport's ``segment_size`` set to ``size`` bytes to
    ``out`` (e.g. the loopback profile for a process that writes raw 4K frames); returns ``out``."""
    tree = ET.parse(profile)
    for t in tree.getroot().iter(f"{FASTDDS}transport_descriptor"):
        if t.findtext(f"{FASTDDS}type") == "SHM":
            t.find(f"{FASTDDS}segment_size").text = str(size)
    ET.register_namespace("", FASTDDS[1:-1])
    tree.write(out, xml_declaration=True, encoding="UTF-8")
    return out


def mapped_segments(pid: int | str = "self") -> dict[str, int]:
    """The Fast DDS shared-memory files process ``pid`` maps (path -> bytes): its transport's own
    segment (when it started), the segments of writers it has received from, and Fast DDS's
    data-sharing segments (small, whatever the profile)."""
    sizes = {}
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if SEGMENT_FILE.search(path) and path not in sizes:
                try:
                    sizes[path] = os.stat(path).st_size
                except FileNotFoundError:  # removed since: its writer has gone
                    continue
    return sizes


def transport_status(pid: int | str = "self") -> str:
    """``"on"`` when the process maps a Fast DDS segment as large as its profile's, else why
    not, with what to do: the RMW is not Fast DDS, no profile is set (Fast DDS's builtin
    transport queues 512 fragments: most raw 4K frames are lost), or the segment could not be
    made (``/dev/shm`` free space against the profile's segment). Meant for a process's own check
    right after its participant starts, before it could have mapped a writer's segment."""
    rmw = os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    if not rmw.startswith("rmw_fastrtps"):
        return f"not checked: {rmw} is not Fast DDS"
    profile = os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE", "")
    try:
        wanted = max(segment_sizes(Path(profile)), default=0) if profile else 0
    except (OSError, ET.ParseError) as exc:
        return f"off: FASTDDS_DEFAULT_PROFILES_FILE={profile} cannot be read ({exc})"
    if not wanted:
        return (
            "default: no Fast DDS profile with a shared-memory transport; the builtin one queues 512 "
            "fragments and loses most raw 4K frames: set FASTDDS_DEFAULT_PROFILES_FILE to config/fastdds_shm.xml"
        )
    if any(size >= wanted for size in mapped_segments(pid).values()):
        return "on"
    free = shutil.disk_usage("/dev/shm").free if Path("/dev/shm").is_dir() else 0
    return (
        f"off: no Fast DDS shared-memory segment (/dev/shm has {free / MIB:.0f} MiB free, the profile asks "
        f"for {wanted / MIB:.0f} MiB); raw frames over a few hundred KiB will be lost at best effort: give "
        "/dev/shm more room (docker --shm-size=512m or --ipc=host) or use a profile with a smaller segment"
    )
