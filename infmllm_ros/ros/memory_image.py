"""``~/memory_image``: a picture of what the stream still remembers.

A mosaic of the thumbnails of the frames that hold slots in the KV cache, oldest first, newest
last, each captioned with its stamp, camera and the KV slots it keeps (mean per (layer, KV head)
row), where the robot was when it has a pose; a novel frame's caption also names what the model
saw. Drawn with OpenCV.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from ..runtime.session import THUMBNAIL_SIZE, MemoryFrame

CAPTION_H = 52  # pixels of caption under each thumbnail: four lines


def mosaic(frames: list[MemoryFrame], columns: int = 8) -> np.ndarray:
    """uint8 RGB ``[rows * (72 + 52), columns * 96, 3]`` mosaic of ``frames`` (row-major, oldest
    first); a frame without a thumbnail (loaded from a memory file) is a grey tile. An empty
    memory is one black tile. Stamps are stream seconds, as in the frame tags and answers."""
    w, h = THUMBNAIL_SIZE
    rows = max(1, math.ceil(len(frames) / columns))
    out = np.zeros((rows * (h + CAPTION_H), columns * w, 3), np.uint8)
    for i, f in enumerate(frames):
        y, x = (i // columns) * (h + CAPTION_H), (i % columns) * w
        out[y : y + h, x : x + w] = f.thumbnail if f.thumbnail is not None else 96
        where = f"({f.pose.x:.0f},{f.pose.y:.0f}) {f.pose.frame_id}"[:16] if f.pose is not None else ""
        lines = (f"t={f.stamp_s:.0f}s {f.camera}"[:16], f"{f.slots:.0f} KV slots", where, f.label[:16])
        for j, text in enumerate(lines):
            cv2.putText(
                out, text, (x + 2, y + h + 11 + 12 * j), cv2.FONT_HERSHEY_PLAIN, 0.8, (255, 255, 255), 1, cv2.LINE_AA
            )
    return out
