"""ROS image messages -> RGB arrays, with a clear error for anything that is not a valid frame.

Works on any object with the fields of ``sensor_msgs/Image`` (``encoding, height, width, step,
is_bigendian, data``) or ``sensor_msgs/CompressedImage`` (``format, data``), so it is tested
without a ROS graph. Decoding is OpenCV's (``cv2.imdecode`` for JPEG/PNG, ``cv2.cvtColor`` for
YUV 4:2:2 and Bayer-free colour conversions).
"""
from __future__ import annotations

import cv2
import numpy as np

#: Raw encodings accepted (sensor_msgs/image_encodings names) -> (channels, OpenCV conversion to RGB).
RAW_ENCODINGS = {
    "rgb8": (3, None),
    "bgr8": (3, cv2.COLOR_BGR2RGB),
    "rgba8": (4, cv2.COLOR_RGBA2RGB),
    "bgra8": (4, cv2.COLOR_BGRA2RGB),
    "mono8": (1, cv2.COLOR_GRAY2RGB),
    # YUV 4:2:2, two bytes per pixel. ROS names: yuv422 = UYVY byte order, yuv422_yuy2 = YUYV.
    "yuv422": (2, cv2.COLOR_YUV2RGB_UYVY),
    "uyvy": (2, cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": (2, cv2.COLOR_YUV2RGB_YUYV),
    "yuyv": (2, cv2.COLOR_YUV2RGB_YUYV),
}


class FrameError(ValueError):
    """A message that cannot be turned into a frame; the text says what is wrong with it."""


def _as_bytes(data) -> np.ndarray:
    """View a message's ``uint8[]`` field (bytes, array.array, numpy, or a list) as uint8 [N]."""
    try:
        return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    except TypeError:
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def raw_to_rgb(msg) -> np.ndarray:
    """Convert a ``sensor_msgs/Image`` to a uint8 RGB array ``[height, width, 3]``.

    Raises:
        FrameError: unknown encoding, zero size, odd width for YUV 4:2:2, a row stride shorter
            than a row, or a data buffer that does not hold ``height * step`` bytes.
    """
    encoding = msg.encoding.lower()
    if encoding not in RAW_ENCODINGS:
        raise FrameError(f"unknown image encoding {msg.encoding!r} (supported: {', '.join(RAW_ENCODINGS)})")
    channels, conversion = RAW_ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise FrameError(f"image has zero size ({width}x{height})")
    if channels == 2 and width % 2:
        raise FrameError(f"{encoding} needs an even width, got {width}")
    row = width * channels
    if step < row:
        raise FrameError(f"row step {step} B is shorter than a {width}-pixel {encoding} row ({row} B)")
    data = _as_bytes(msg.data)
    if data.size != height * step:
        raise FrameError(f"{width}x{height} {encoding} image with step {step} needs {height * step} B, "
                         f"got {data.size} B")
    pixels = data.reshape(height, step)[:, :row].reshape(height, width, channels)
    if conversion is None:
        return np.ascontiguousarray(pixels)
    return cv2.cvtColor(np.ascontiguousarray(pixels), conversion)


def compressed_to_rgb(msg) -> np.ndarray:
    """Decode a ``sensor_msgs/CompressedImage`` (JPEG, PNG, ... as OpenCV reads) to RGB uint8.

    Raises:
        FrameError: empty payload, or bytes OpenCV cannot decode (corrupt or unsupported format).
    """
    data = _as_bytes(msg.data)
    if data.size == 0:
        raise FrameError("compressed image is empty")
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise FrameError(f"cannot decode {data.size}-byte compressed image (format {msg.format!r}): "
                         "corrupt or unsupported")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def to_rgb(msg, compressed: bool) -> np.ndarray:
    """Dispatch on the transport: ``compressed`` -> :func:`compressed_to_rgb`, else :func:`raw_to_rgb`."""
    return compressed_to_rgb(msg) if compressed else raw_to_rgb(msg)


def thumbnail(rgb: np.ndarray, size: int = 32) -> np.ndarray:
    """Grey ``[size, size]`` float32 thumbnail in [0, 1], for near-duplicate detection."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def frame_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two :func:`thumbnail` arrays, in [0, 1] (0 = identical)."""
    return float(np.abs(a - b).mean())
