"""Frames from a video file with PyAV, sampled uniformly the way transformers' video processors sample them.

PyAV (``av``) wraps FFmpeg's own libraries in its wheel, so any container/codec FFmpeg reads works on CPU with no
system install; transformers' ``load_video`` needs torchvision or one of several optional decoders instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class VideoReadError(ValueError):
    """The file exists but is not a video PyAV can decode (or has too few frames)."""


def sample_indices(total: int, frames: int) -> np.ndarray:
    """``frames`` indices spread evenly over ``total`` (transformers' ``default_sample_indices_fn``)."""
    if frames < 1:
        raise ValueError(f"frames: expected at least 1, got {frames}")
    if frames > total:
        raise VideoReadError(f"the video has {total} frames, fewer than the {frames} asked for")
    return np.arange(frames, dtype=np.int64) * total // frames


def read_video(path: str | Path, frames: int) -> np.ndarray:
    """``frames`` RGB frames ``[frames, H, W, 3]`` uint8 of the first video stream of ``path``, uniformly sampled.

    Raises ``FileNotFoundError`` for a missing path and :class:`VideoReadError` for a file that does not decode.
    """
    try:
        import av
    except ImportError as exc:
        raise ImportError("video: reading video files needs PyAV (pip install -e .[video])") from exc

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"video: no such file {str(p)!r}")
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise VideoReadError(f"video: {str(p)!r} has no video stream")
            # Containers do not always record a frame count (stream.frames == 0): count by decoding then.
            total = container.streams.video[0].frames or sum(1 for _ in container.decode(video=0))
        if frames > total:
            raise VideoReadError(f"video: {str(p)!r} has {total} frames, fewer than the {frames} asked for")
        wanted = sample_indices(total, frames)
        picked: dict[int, np.ndarray] = {}
        with av.open(str(p)) as container:
            want = set(wanted.tolist())
            for i, frame in enumerate(container.decode(video=0)):
                if i in want:
                    picked[i] = frame.to_ndarray(format="rgb24")
                    if len(picked) == len(want):
                        break
    except av.FFmpegError as exc:
        raise VideoReadError(f"video: cannot decode {str(p)!r}: {exc}") from exc
    if len(picked) != len(wanted):  # the container's frame count was larger than what decodes
        raise VideoReadError(f"video: {str(p)!r} says {total} frames but {len(picked)} of the sampled "
                             f"{len(wanted)} decode")
    return np.stack([picked[i] for i in wanted.tolist()])


def write_test_video(path: str | Path, frames: int = 16, size: int = 64, fps: int = 8) -> Path:
    """A small MPEG-4 clip of a white square moving across a dark background (for tests and demos)."""
    import av

    p = Path(path)
    with av.open(str(p), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        side = size // 4
        for t in range(frames):
            img = np.full((size, size, 3), 30, dtype=np.uint8)
            x = (t * (size - side)) // max(frames - 1, 1)
            img[size // 2 - side // 2: size // 2 + side // 2, x: x + side] = (240, 240, 240)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return p
