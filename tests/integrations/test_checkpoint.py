"""A locally written checkpoint folder and video file, loaded the way a user loads real ones (nothing downloaded).

The folder is written by ``wq_compile.integrations.checkpoint``; its text/pixel preprocessing runs without
torchvision (``integrations.preprocess``) and is checked against the pinned transformers' processor code, an
independent numpy resize, and (where torchvision imports) transformers' own torchvision processor.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wq_compile.integrations.checkpoint import CHAT_TEMPLATE, write_tiny_checkpoint
from wq_compile.integrations.preprocess import (
    PixelSettings,
    VideoProcessor,
    preprocess_frames,
    video_question,
)
from wq_compile.integrations.tiny import IMAGE_TOKEN, VIDEO_TOKEN, tiny_model
from wq_compile.integrations.video import VideoReadError, read_video, write_test_video

ROOT = Path(__file__).resolve().parents[2]
HUB_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json",
             "processor_config.json")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava-ov", layers=2, seed=0)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_video(tmp_path_factory.mktemp("video") / "squares.mp4", frames=16, size=64)


def test_folder_holds_the_hub_files_and_loads_the_same_weights(folder: Path) -> None:
    from transformers import LlavaOnevisionForConditionalGeneration

    missing = [f for f in HUB_FILES if not (folder / f).is_file()]
    assert not missing, missing
    loaded = LlavaOnevisionForConditionalGeneration.from_pretrained(str(folder), local_files_only=True)
    want = tiny_model(layers=2, seed=0).state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_tokenizer_ids_agree_with_the_model_config(folder: Path) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    proc = VideoProcessor.from_pretrained(folder)
    tok = proc.tokenizer
    assert len(tok) == cfg.text_config.vocab_size
    assert tok.convert_tokens_to_ids("<video>") == cfg.video_token_index == VIDEO_TOKEN == proc.video_token_id
    assert tok.convert_tokens_to_ids("<image>") == cfg.image_token_index == IMAGE_TOKEN
    assert tok.pad_token_id == cfg.text_config.pad_token_id
    assert proc.chat_template == CHAT_TEMPLATE
    text = proc.prompt("What moves?")
    assert text == "<|im_start|>user\n<video>\nWhat moves?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(VIDEO_TOKEN) == 1 and tok.decode(ids) == text  # byte-level BPE round-trips


def test_video_token_count_is_the_transformers_processors(folder: Path) -> None:
    """Against the pinned ``LlavaOnevisionProcessor`` methods themselves (they only read ``num_image_tokens``)."""
    from transformers import LlavaOnevisionProcessor

    proc = VideoProcessor.from_pretrained(folder)
    assert proc.num_image_tokens == 27 * 27
    hf = SimpleNamespace(num_image_tokens=proc.num_image_tokens, video_token="<video>")
    for frames in (1, 2, 7):
        pixels = {"pixel_values_videos": [torch.zeros(frames, 3, 4, 4)]}
        want = LlavaOnevisionProcessor.replace_video_token(hf, pixels, 0).count("<video>")
        assert proc.video_token_count(frames) == want == frames * 196 + 1
        sizes = LlavaOnevisionProcessor._get_num_multimodal_tokens(hf, video_sizes=[(frames, 378, 378)])
        assert sizes["num_video_tokens"] == [want]
    inputs = proc(proc.prompt("Q?"), [np.zeros((3, 40, 50, 3), np.uint8)])
    assert int((inputs["input_ids"] == VIDEO_TOKEN).sum()) == proc.video_token_count(3)
    assert inputs["pixel_values_videos"].shape == (1, 3, 3, 378, 378)


def _bicubic_weights(n_in: int, n_out: int) -> np.ndarray:
    """PIL's resampling matrix ``[n_out, n_in]``: Keys cubic (a = -0.5), support widened by the downscale factor."""
    scale = n_in / n_out
    fs = max(scale, 1.0)

    def cubic(x: np.ndarray) -> np.ndarray:
        a, x = -0.5, np.abs(x)
        return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                        np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))

    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - 2 * fs + 0.5), 0), min(int(center + 2 * fs + 0.5), n_in)
        k = cubic((np.arange(lo, hi) - center + 0.5) / fs)
        w[i, lo:hi] = k / k.sum()
    return w


def _numpy_pixels(frames: np.ndarray, size: int, mean: float, std: float) -> np.ndarray:
    """Two separable passes, each rounded to uint8 as PIL stores its intermediate, then normalize. Pillow runs
    first the pass whose intermediate image is smaller (rounding makes the order visible in a few pixels)."""
    wx, wy = _bicubic_weights(frames.shape[2], size), _bicubic_weights(frames.shape[1], size)

    def to_uint8(a: np.ndarray) -> np.ndarray:
        return np.clip(np.floor(a + 0.5), 0, 255)

    x = frames.astype(np.float64)
    if size * frames.shape[1] <= frames.shape[2] * size:  # horizontal first leaves out_w x in_h
        x = to_uint8(np.einsum("oh,thwc->towc", wy, to_uint8(np.einsum("ow,thwc->thoc", wx, x))))
    else:
        x = to_uint8(np.einsum("ow,thwc->thoc", wx, to_uint8(np.einsum("oh,thwc->towc", wy, x))))
    return ((x / 255 - mean) / std).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("shape", [(2, 100, 140), (1, 500, 420)])  # upscale with a new aspect; downscale
def test_pixels_equal_an_independent_numpy_resize_and_normalize(folder: Path, shape: tuple[int, int, int]) -> None:
    proc = VideoProcessor.from_pretrained(folder)
    s = proc.pixels
    assert (s.height, s.width, s.resample, s.mean, s.std) == (378, 378, 3, (0.5,) * 3, (0.5,) * 3)
    frames = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    got = preprocess_frames(frames, s).numpy()
    want = _numpy_pixels(frames, 378, 0.5, 0.5)
    level = 1 / 255 / 0.5  # one uint8 step after normalization: PIL's fixed-point weights may round the other way
    diff = np.abs(got - want)
    assert got.shape == want.shape and got.dtype == np.float32
    assert diff.max() <= level + 1e-5, diff.max() / level
    assert (diff < 1e-5).mean() > 0.999  # all but a few pixels exactly equal


def test_pixel_settings_refuse_what_they_do_not_implement() -> None:
    with pytest.raises(ValueError, match="fixed frame size"):
        PixelSettings.from_dict({"size": {"shortest_edge": 384}}, "x.json")
    with pytest.raises(ValueError, match="do_center_crop"):
        PixelSettings.from_dict({"do_center_crop": True}, "x.json")
    with pytest.raises(ValueError, match="uint8"):
        preprocess_frames(np.zeros((1, 8, 8, 3), np.float32), PixelSettings.from_dict({}, "x.json"))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="torchvision is not installed (no wheel loads beside the CPU torch build); the numpy test "
                           "above checks the same pixels")
def test_pixels_and_ids_equal_the_torchvision_processor(folder: Path) -> None:
    from transformers import AutoProcessor

    hf = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    ours = VideoProcessor.from_pretrained(folder)
    frames = np.random.default_rng(1).integers(0, 256, (3, 90, 120, 3), dtype=np.uint8)
    text = ours.prompt("What moves?")
    want = hf(text=text, videos=[frames], return_tensors="pt")
    got = ours(text, [frames])
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert got["pixel_values_videos"].shape == want["pixel_values_videos"].shape
    level = 1 / 255 / 0.5
    assert (got["pixel_values_videos"] - want["pixel_values_videos"]).abs().max() <= level + 1e-5


def test_read_video_samples_uniformly_like_transformers(video: Path) -> None:
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    frames = read_video(video, 4)
    assert frames.shape == (4, 64, 64, 3) and frames.dtype == np.uint8
    want = default_sample_indices_fn(VideoMetadata(total_num_frames=16, fps=8), num_frames=4)
    assert want.tolist() == [0, 4, 8, 12]
    every = read_video(video, 16)
    assert np.array_equal(frames, every[want])
    # the white square moves right: its mean column grows frame by frame
    cols = [np.nonzero(f[..., 0].max(0) > 128)[0].mean() for f in frames]
    assert all(a < b for a, b in itertools.pairwise(cols)), cols


def test_read_video_errors_say_what_is_wrong(tmp_path: Path, video: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_video(tmp_path / "missing.mp4", 4)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 50)
    with pytest.raises(VideoReadError, match="cannot decode"):
        read_video(junk, 4)
    with pytest.raises(VideoReadError, match="16 frames, fewer than the 17"):
        read_video(video, 17)


def test_generate_on_the_folder_and_a_video(folder: Path, video: Path) -> None:
    """Token counts line up with the vision tower (the model raises otherwise) and the video's pixels reach it."""
    from wq_compile import ATTN_IMPLEMENTATION
    from wq_compile.integrations.preprocess import load_checkpoint

    model, proc = load_checkpoint(folder, ATTN_IMPLEMENTATION)
    prompt = video_question(model, proc, read_video(video, 2), "What moves?")
    assert prompt.frames == (2,)
    with torch.no_grad():
        out = model.generate(**prompt.inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == prompt.inputs["input_ids"].shape[1] + 2
    pixels = prompt.inputs["pixel_values_videos"]
    assert math.isclose(float(pixels.median()), (30 / 255 - 0.5) / 0.5, abs_tol=1e-4)  # the dark background
    assert float(pixels.max()) > (200 / 255 - 0.5) / 0.5  # the bright square


def _example(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "examples" / "video_qa.py"), *args], capture_output=True,
                          text=True, timeout=600, check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_example_runs_on_the_folder_and_the_video(folder: Path, video: Path) -> None:
    proc = _example("--model-path", str(folder), "--video", str(video), "--frames", "2", "--new-tokens", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "(2 frames, 392 visual tokens), 2 layers" in out and "4 new tokens" in out
    assert "WindowQuant answer: " in out
    assert "KV memory: dense fp16" in out and "plan (effective" in out
    assert "decode kernel calls 6, reference calls 0" in out, out  # 2 layers x 3 decode steps, compiled path


def test_example_refuses_a_missing_video_in_one_line(folder: Path, tmp_path: Path) -> None:
    """(An unreadable file takes the same path; ``test_read_video_errors_say_what_is_wrong`` covers its message.)"""
    proc = _example("--model-path", str(folder), "--video", str(tmp_path / "nope.mp4"))
    assert proc.returncode != 0 and "video_qa: video: no such file" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_wq_eval_runs_on_the_folder(folder: Path, capsys: pytest.CaptureFixture) -> None:
    from wq_compile.tools.cli import main_eval

    rc = main_eval(["--model", str(folder), "--frames", "2", "--new-tokens", "4", "--repeats", "1", "--avg-bits",
                    "4", "--backend", "reference"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "prompt: " in text and "(2 frames)" in text
    assert "dense (DynamicCache)" in text and "WindowQuant avg 4 bits" in text


def test_wq_eval_analyze_runs_on_the_folder(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from wq_compile.tools.cli import main_eval

    rc = main_eval(["--analyze", "--workloads", "", "--model", str(folder), "--frames", "2", "--budgets", "3",
                    "--out", str(tmp_path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "tiny-llava-ov" in text and "your checkpoint" in text
    assert (tmp_path / "policies.csv").is_file()
