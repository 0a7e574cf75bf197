"""ROS image messages -> RGB arrays, with a clear error for anything that is not a valid frame.

Works on any object with the fields of ``sensor_msgs/Image`` (``encoding, height, width, step,
is_bigendian, data``) or ``sensor_msgs/CompressedImage`` (``format, data``), so it is tested
without a ROS graph. Decoding is OpenCV's (``cv2.imdecode`` for JPEG/PNG, ``cv2.cvtColor`` for
YUV 4:2:2 and Bayer-free colour conversions).
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import PIL.Image

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


#: Default pixel limit (width x height) of a frame: 4096 x 4096 takes 4K UHD (3840 x 2160) and
#: 12-megapixel cameras; a PNG that decodes to 16000 x 16000 (a 730 KiB "decompression bomb")
#: is refused from its header.
MAX_FRAME_PIXELS = 4096 * 4096


class FrameError(ValueError):
    """A message that cannot be turned into a frame; the text says what is wrong with it."""


class FrameTooLarge(FrameError):
    """A frame with more pixels than allowed, found before its pixels are decoded."""


def check_size(width: int, height: int, max_pixels: int, what: str) -> None:
    """Raise :class:`FrameTooLarge` when ``width x height`` exceeds ``max_pixels``."""
    if width * height > max_pixels:
        raise FrameTooLarge(
            f"{what} of {width}x{height} = {width * height} pixels is over the limit of {max_pixels} (max_frame_pixels)"
        )


def _as_bytes(data) -> np.ndarray:
    """View a message's ``uint8[]`` field (bytes, array.array, numpy, or a list) as uint8 [N]."""
    try:
        return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    except TypeError:
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def raw_to_rgb(msg, max_pixels: int = MAX_FRAME_PIXELS) -> np.ndarray:
    """Convert a ``sensor_msgs/Image`` to a uint8 RGB array ``[height, width, 3]``.

    Raises:
        FrameTooLarge: more than ``max_pixels`` pixels (checked first, from the header fields).
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
    check_size(width, height, max_pixels, f"{encoding} image")
    if channels == 2 and width % 2:
        raise FrameError(f"{encoding} needs an even width, got {width}")
    row = width * channels
    if step < row:
        raise FrameError(f"row step {step} B is shorter than a {width}-pixel {encoding} row ({row} B)")
    data = _as_bytes(msg.data)
    if data.size != height * step:
        raise FrameError(
            f"{width}x{height} {encoding} image with step {step} needs {height * step} B, got {data.size} B"
        )
    pixels = data.reshape(height, step)[:, :row].reshape(height, width, channels)
    if conversion is None:
        return np.ascontiguousarray(pixels)
    return cv2.cvtColor(np.ascontiguousarray(pixels), conversion)


def compressed_to_rgb(msg, max_pixels: int = MAX_FRAME_PIXELS) -> np.ndarray:
    """Decode a ``sensor_msgs/CompressedImage`` (JPEG, PNG, WebP, ...) to RGB uint8.

    The size is read from the file header first (Pillow reads only the header), so an image
    that would decode to too many pixels costs microseconds, not its decoded size; the pixels
    are then decoded by OpenCV.

    Raises:
        FrameTooLarge: a header with more than ``max_pixels`` pixels.
        FrameError: empty payload, a header no reader recognises, or bytes OpenCV cannot decode
            (corrupt or unsupported format).
    """
    data = _as_bytes(msg.data)
    if data.size == 0:
        raise FrameError("compressed image is empty")
    try:
        with PIL.Image.open(io.BytesIO(data.tobytes())) as header:
            width, height = header.size
    except PIL.Image.DecompressionBombError as exc:  # Pillow's own header check, far above ours
        raise FrameTooLarge(f"{msg.format or 'compressed'} image: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad headers
        raise FrameError(
            f"cannot decode {data.size}-byte compressed image (format {msg.format!r}): "
            f"corrupt or unsupported ({type(exc).__name__})"
        ) from None
    check_size(width, height, max_pixels, f"{msg.format or 'compressed'} image")
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise FrameError(
            f"cannot decode {data.size}-byte compressed image (format {msg.format!r}): corrupt or unsupported"
        )
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def to_rgb(msg, compressed: bool, max_pixels: int = MAX_FRAME_PIXELS) -> np.ndarray:
    """Dispatch on the transport: ``compressed`` -> :func:`compressed_to_rgb`, else :func:`raw_to_rgb`."""
    return compressed_to_rgb(msg, max_pixels) if compressed else raw_to_rgb(msg, max_pixels)


def thumbnail(rgb: np.ndarray, size: int = 32) -> np.ndarray:
    """Grey ``[size, size]`` float32 thumbnail in [0, 1], for near-duplicate detection."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def frame_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two :func:`thumbnail` arrays, in [0, 1] (0 = identical)."""
    return float(np.abs(a - b).mean())
