"""Write a tiny LLaVA-OneVision checkpoint folder laid out like a hub one, with nothing downloaded.

``llava-hf/llava-onevision-qwen2-0.5b-ov-hf`` holds ``config.json``, ``generation_config.json``,
``model.safetensors``, the Qwen2 tokenizer (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``), the processor's chat template (``chat_template.jinja``) and three processor files
(``preprocessor_config.json`` for images, ``video_preprocessor_config.json`` for videos, ``processor_config.json``).
This writes the same files for the random-weight model of :mod:`.tiny`, so the path a user takes with a real
checkpoint (``from_pretrained`` on a folder, the folder's tokenizer, template and pixel settings) runs in CI:

    python -m wq_compile.integrations.checkpoint /tmp/tiny-llava-ov [--layers 2]

The tokenizer is a byte-level BPE trained here on a few sentences; its ids agree with the model config (pad 0,
``<|im_start|>`` 1, ``<|im_end|>`` 2 = EOS, ``<image>`` 998, ``<video>`` 999, 1000 ids in all).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .tiny import IMAGE_TOKEN, PAD, VIDEO_TOKEN, tiny_model

#: Special tokens at the ids the tiny config names (Qwen2's names: pad/eos are its chat markers).
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
IMAGE, VIDEO = "<image>", "<video>"

#: The processor's chat template, as llava-onevision-qwen2 checkpoints write it: images, then videos, then text.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: Text the BPE merges are learned from (any English works; this only has to be deterministic).
_CORPUS = (
    "What happens in this video? Describe the video in detail. A person walks across the room and picks up a cup.",
    "The red square moves from the left to the right while the blue circle stays still in the corner.",
    "How many people are in the scene? Two children fly a yellow kite on a windy hill above a small village.",
    "A chef slices onions quickly on a wooden board in a crowded restaurant kitchen during the evening rush.",
    "The camera pans over a snowy street; a man in a grey coat waits alone at the bus stop and reads a paper.",
    "Answer the question about the frames: what color is the car, where does it go, and when does it stop?",
    "system user assistant You are a helpful assistant. Please answer briefly and accurately.",
)

#: SigLIP's pixel statistics, as the released llava-onevision-qwen2 processors carry them.
SIGLIP_MEAN, SIGLIP_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC


def build_tokenizer(vocab_size: int) -> object:
    """A byte-level BPE whose special ids match the tiny config: specials first, ``<image>``/``<video>`` last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if IMAGE_TOKEN != vocab_size - 2 or VIDEO_TOKEN != vocab_size - 1 or PAD != 0:
        raise ValueError(f"checkpoint: the tokenizer puts <image>/<video> at the last two of {vocab_size} ids, "
                         f"the config has {IMAGE_TOKEN}/{VIDEO_TOKEN}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    # A short corpus may stop merging before vocab_size - 2: reserved specials fill the gap so the ids line up.
    filler = [f"<|reserved_{i}|>" for i in range(tok.get_vocab_size(), vocab_size - 2)]
    tok.add_special_tokens(filler + [IMAGE, VIDEO])
    got = {t: tok.token_to_id(t) for t in (*SPECIALS, IMAGE, VIDEO)}
    want = {SPECIALS[0]: PAD, SPECIALS[1]: 1, SPECIALS[2]: 2, IMAGE: IMAGE_TOKEN, VIDEO: VIDEO_TOKEN}
    if got != want or tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"checkpoint: tokenizer ids {got} (size {tok.get_vocab_size()}), expected {want} "
                           f"(size {vocab_size})")
    return tok


def _processor_files(size: int, num_image_tokens: int, grid: list[list[int]]) -> dict[str, dict]:
    """The three processor JSON files, with the keys transformers' LlavaOnevision processors save."""
    common = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
              "image_mean": SIGLIP_MEAN, "image_std": SIGLIP_STD, "processor_class": "LlavaOnevisionProcessor",
              "resample": BICUBIC, "rescale_factor": 1 / 255, "size": {"height": size, "width": size}}
    image = {**common, "do_pad": True, "image_grid_pinpoints": grid,
             "image_processor_type": "LlavaOnevisionImageProcessor"}
    video = {**common, "crop_size": None, "default_to_square": False, "do_center_crop": None,
             "do_sample_frames": False, "fps": None, "num_frames": None, "return_metadata": False,
             "video_processor_type": "LlavaOnevisionVideoProcessor"}
    processor = {"image_token": IMAGE, "video_token": VIDEO, "num_image_tokens": num_image_tokens,
                 "processor_class": "LlavaOnevisionProcessor", "vision_aspect_ratio": "anyres_max_9",
                 "vision_feature_select_strategy": "full"}
    return {"preprocessor_config.json": image, "video_preprocessor_config.json": video,
            "processor_config.json": processor}


def write_tiny_checkpoint(out_dir: str | Path, layers: int = 2, seed: int = 0) -> Path:
    """Write the tiny random-weight model (``layers`` decoder layers, weights from ``seed``) and its tokenizer and
    processor files into ``out_dir``; returns the folder. Loads with ``from_pretrained(out_dir)``."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_model(layers=layers, seed=seed)
    model.config.text_config.eos_token_id = None  # random weights: never stop early, like tiny_model's generate
    model.save_pretrained(out, safe_serialization=True)

    cfg = model.config
    tok = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(cfg.text_config.vocab_size), pad_token=SPECIALS[0], eos_token=SPECIALS[2],
        bos_token=None, unk_token=None, model_max_length=cfg.text_config.max_position_embeddings,
        padding_side="left", extra_special_tokens={"image_token": IMAGE, "video_token": VIDEO},
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)

    vision = cfg.vision_config
    patches = vision.image_size // vision.patch_size
    for name, body in _processor_files(vision.image_size, patches * patches, cfg.image_grid_pinpoints).items():
        (out / name).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m wq_compile.integrations.checkpoint",
                                 description="Write a tiny random-weight LLaVA-OneVision checkpoint folder "
                                             "(config, safetensors, tokenizer, chat template, processor files).")
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = write_tiny_checkpoint(args.out_dir, layers=args.layers, seed=args.seed)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
