"""Reward functions for Flow-GRPO: scalar scores for generated images.

The contract
------------
Every reward is a callable

    reward(images, prompts, metadata) -> torch.Tensor  # shape (N,), float32, on CPU

* ``images``:   float tensor (N, 3, H, W) with values in [0, 1], any device/dtype.
* ``prompts``:  list of N strings, the prompts the images were generated from.
* ``metadata``: list of N dicts (possibly empty) with per-prompt extras, e.g.
                ``{"text": "OPEN"}`` for the OCR reward.

Higher is always better: the trainer maximises the reward. Rewards do not check
for NaN or shapes themselves; the trainer calls them through ``score`` (at the end
of this file), which validates what comes back in one place.

Rewards, their ranges and what they are for
-------------------------------------------
======================  ======================  ======================================
name                    range                   what it measures
======================  ======================  ======================================
jpeg_compressibility    (-inf, 0], ~-0.04..0    minus JPEG size in kB / 500 (DDPO toy task)
jpeg_incompressibility  [0, inf),  ~0..0.04     plus JPEG size in kB / 500 (DDPO toy task)
ocr                     [0, 1]                  how well the rendered text matches
pickscore               ~[-4, 4],  ~0.7..0.95   human preference (PickScore_v1) / 26
clipscore               ~[-3, 3],  ~0.5..1.3    100 x image-text cosine (CLIP) / 30
geneval                 [-14, 1],  ~0..1        GenEval partial credit: objects, counts, colours, positions
======================  ======================  ======================================

(The typical values are for 512x512 images; JPEG sizes grow with resolution.)

Why the divisors: they are the reference implementation's (flow_grpo/rewards.py: JPEG compressibility -kB/500, its
incompressibility +kB is the one exception here, mirrored as +kB/500;
pickscore_scorer.py: logit_scale*cos/26; clip_scorer.py: logits_per_image/30). A reward alone trains the
same whatever its scale (GRPO normalises rewards by their std), but in a weighted sum such as
"ocr=0.5,pickscore=0.5" the scales set the mix, so they must be the reference's for its weights to mean
the same here. PickScore is usually quoted raw (~18..24): raw = 26 x ours.

Building a reward from a string
-------------------------------
The trainer names its reward on the command line, so rewards are built from a
spec string with :func:`build_reward`:

    reward = build_reward("ocr=0.5,pickscore=0.5", device="cuda")

It returns a :class:`WeightedReward`. One design, two entry points:

* ``reward.components(images, prompts, metadata)`` -> ``{name: (N,) tensor}``,
  every named reward evaluated once (log these), plus ``"name/key"`` diagnostics
  from rewards that have a ``details`` method (e.g. ``geneval/strict``);
* ``reward.combine(components)`` -> the weighted sum, an (N,) tensor (train on it);
* ``reward(images, prompts, metadata)`` is simply ``combine(components(...))``,
  so a WeightedReward obeys the same contract as a single reward.

A trainer that wants both calls ``components`` once, logs the dict, and passes
it to ``combine`` -- no reward model runs twice.

``REWARDS`` maps each name to a *factory* ``factory(device="cpu", **options)``
that returns the reward callable. Model-backed rewards (pickscore, clipscore, geneval)
load their weights lazily on the first call, so building any reward is cheap,
and ``import rewards`` itself imports neither transformers nor pytesseract.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
import shutil
import socket
import sys
import urllib.parse
from dataclasses import dataclass, replace
from typing import Callable

import torch
from PIL import Image

__all__ = [
    "REWARDS",
    "RewardError",
    "ClipReward",
    "Detection",
    "GenevalReward",
    "WeightedReward",
    "build_reward",
    "check_geneval_metadata",
    "clipscore",
    "detector_input",
    "detector_instances",
    "geneval",
    "geneval_colors_needed",
    "geneval_correct",
    "geneval_score",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "jpeg_size_kb",
    "levenshtein",
    "load_pretrained",
    "mask_boxes",
    "masked_crop",
    "normalize_text",
    "ocr",
    "ocr_score",
    "ocr_target",
    "parse_model_options",
    "parse_spec",
    "pickscore",
    "score",
    "check_reward",
    "relative_position",
    "select_detections",
    "to_pil",
    "to_uint8",
]


# --------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Round a (N, 3, H, W) float tensor in [0, 1] to 8-bit pixels, (N, 3, H, W) uint8 on the same device.

    Rounding to 8 bits is what happens when a generated image is saved, so the
    image-file based rewards (JPEG, OCR), the CLIP processors and the GenEval
    detector see exactly what a person looking at the saved PNG would see.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"rewards expect images of shape (N, 3, H, W), got {tuple(images.shape)}; "
            "decode latents to pixels (values in [0, 1]) before scoring"
        )
    # Why clamp: the VAE decoder can overshoot [0, 1] slightly; uint8 would wrap.
    return images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Convert a (N, 3, H, W) float tensor in [0, 1] to N RGB PIL images (8-bit, see :func:`to_uint8`)."""
    arrays = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)
    return [Image.fromarray(a) for a in arrays]


def _as_scores(values) -> torch.Tensor:
    """Pack per-image Python floats (or a tensor) into the contract's (N,) float32 CPU tensor."""
    return torch.as_tensor(values, dtype=torch.float32).reshape(-1).cpu()


# --------------------------------------------------------------------------
# JPEG (in)compressibility -- the DDPO toy rewards
# --------------------------------------------------------------------------

# Why 95: a high quality setting keeps the encoder from erasing fine detail, so
# the file size tracks how much detail the image really has.
JPEG_QUALITY = 95


def jpeg_size_kb(image: Image.Image, quality: int = JPEG_QUALITY) -> float:
    """Size of ``image`` encoded as JPEG at ``quality``, in kilobytes (1 kB = 1000 bytes)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


# Why 500: the reference's scale (-kB/500), so that weights in a weighted sum mean what they mean there.
JPEG_KB_SCALE = 500


def jpeg_compressibility(images, prompts, metadata) -> torch.Tensor:
    """Minus the JPEG file size in kB (quality 95), divided by 500. RANGE: (-inf, 0].

    Smooth, flat images compress well and score high (close to 0); noisy,
    detailed ones score low. A 512x512 image (2 to 20 kB) lands between -0.04
    and -0.004. Prompts and metadata are ignored.
    """
    return _as_scores([-jpeg_size_kb(im) / JPEG_KB_SCALE for im in to_pil(images)])


def jpeg_incompressibility(images, prompts, metadata) -> torch.Tensor:
    """The JPEG file size in kB (quality 95), divided by 500. RANGE: [0, inf).

    Exactly ``-jpeg_compressibility``: rewards detail and texture. (The
    reference's jpeg_incompressibility returns +kB, undivided: it divides only
    compressibility by 500; this one mirrors compressibility, on its scale.)
    Prompts and metadata are ignored.
    """
    return -jpeg_compressibility(images, prompts, metadata)


# --------------------------------------------------------------------------
# OCR -- does the image show the requested text?
# --------------------------------------------------------------------------

# The target is the first run of text between straight or curly double quotes.
# Why curly quotes too: prompts pasted from documents often contain them.
_QUOTED = re.compile(r"[\"\u201c]([^\"\u201c\u201d]+)[\"\u201d]")


def normalize_text(text: str) -> str:
    """Lowercase and delete all whitespace.

    Why: the reward is about spelling the requested characters. Tesseract's
    case and spacing are unreliable (it splits or joins words depending on
    letter spacing in the image), and a misplaced space should not cost as
    much as a wrong letter. The reference (flow_grpo/ocr.py) lower-cases and
    deletes the spaces ' '; we delete every whitespace character, because
    Tesseract ends lines with a newline where PaddleOCR (the reference's OCR)
    joins the pieces it read with nothing.
    """
    return "".join(text.lower().split())


def levenshtein(a: str, b: str) -> int:
    """Edit distance: fewest single-character insertions, deletions or substitutions turning a into b."""
    # Why one row: row i of the dynamic-programming table only needs row i-1.
    # previous[j] = distance between a[:i-1] and b[:j].
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]  # turning a[:i] into "" takes i deletions
        for j, char_b in enumerate(b, start=1):
            current.append(
                min(
                    previous[j] + 1,  # delete char_a
                    current[j - 1] + 1,  # insert char_b
                    previous[j - 1] + (char_a != char_b),  # substitute (free if equal)
                )
            )
        previous = current
    return previous[-1]


def ocr_target(prompt: str, metadata: dict | None) -> str:
    """The text an image should show: ``metadata["text"]`` if given, else the first quoted text in the prompt."""
    if metadata and metadata.get("text"):
        return str(metadata["text"])
    match = _QUOTED.search(prompt)
    if match is None:
        raise ValueError(
            f"the ocr reward needs a target text, but prompt {prompt!r} has no "
            'text in double quotes and its metadata has no "text" key; '
            'write the text in the prompt (a sign that says "OPEN") or add {"text": ...} to its metadata'
        )
    return match.group(1)


def _tesseract():
    """Import pytesseract and check that the tesseract program is installed."""
    try:
        import pytesseract
    except ImportError as err:
        raise RuntimeError(
            "the ocr reward needs the pytesseract package: pip install pytesseract "
            "(and the tesseract program: apt-get install tesseract-ocr on Debian/Ubuntu)"
        ) from err
    # Why check up front: pytesseract only notices a missing program when it
    # first runs it, with an error that does not say how to install it.
    command = pytesseract.pytesseract.tesseract_cmd
    if shutil.which(command) is None:
        raise RuntimeError(
            f"the ocr reward needs the tesseract program, but {command!r} was not found: "
            "apt-get install tesseract-ocr tesseract-ocr-eng (Debian/Ubuntu) and pip install pytesseract; "
            "or point pytesseract.pytesseract.tesseract_cmd at an installed tesseract"
        )
    return pytesseract


def ocr_score(read: str, target: str) -> float:
    """The OCR reward of one image from the text read in it and the target, the reference's rule
    (flow_grpo/ocr.py), on the normalised strings (:func:`normalize_text`):

        d = 0                                  if the target occurs anywhere in the read text
        d = min(levenshtein(read, target), len(target))   otherwise
        reward = 1 - d / len(target)           in [0, 1]

    Why the substring rule: OCR also reads the other text of a scene (a sign that says "OPEN HOURS" for
    the target "OPEN"); the image did render the target. Why the cap: unrelated extra characters should
    not push the reward below "nothing readable" (0).
    """
    read, target = normalize_text(read), normalize_text(target)
    if not target:
        raise ValueError("the ocr target is empty after removing whitespace")
    d = 0 if target in read else min(levenshtein(read, target), len(target))
    return 1.0 - d / len(target)


def ocr(images, prompts, metadata) -> torch.Tensor:
    """Text-rendering accuracy, :func:`ocr_score` of what Tesseract reads in each image. RANGE: [0, 1].

    ``target`` comes from :func:`ocr_target`. 1 means the target was read back
    (alone or inside other text); 0 means at least as many edits as the
    target has characters (for instance, no text at all).
    """
    metadata = metadata if metadata is not None else [{}] * len(prompts)
    # Resolve every target before running OCR, so a bad prompt fails fast.
    targets = [normalize_text(ocr_target(p, m)) for p, m in zip(prompts, metadata)]
    for prompt, target in zip(prompts, targets):
        if not target:
            raise ValueError(f"the ocr target for prompt {prompt!r} is empty after removing whitespace")
    pytesseract = _tesseract()
    scores = [ocr_score(pytesseract.image_to_string(image), target) for image, target in zip(to_pil(images), targets)]
    return _as_scores(scores)


# --------------------------------------------------------------------------
# CLIP-based rewards: PickScore and CLIP score (one shared implementation)
# --------------------------------------------------------------------------

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
# Why a second id: PickScore_v1 ships only weights; it was fine-tuned from this
# CLIP ViT-H/14, whose tokenizer and image preprocessing it reuses.
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIPSCORE_MODEL = "openai/clip-vit-large-patch14"
# The reference's divisors (pickscore_scorer.py: scores/26; clip_scorer.py: logits_per_image/30).
PICKSCORE_DIVISOR = 26.0
CLIPSCORE_DIVISOR = 30.0


def _looks_like_path(name: str) -> bool:
    """True for strings that can only be a local folder, never a hub id ("org/name")."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


# Why 3 s: a TCP handshake with a reachable hub takes well under a second even on a slow link; 3 s is far below
# the minute the hub client spends retrying when it is not reachable.
@functools.lru_cache(maxsize=None)
def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub ($HF_ENDPOINT) accepts a TCP connection within ``timeout`` seconds.
    Asked once per process."""
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
        return True
    except OSError:  # no route, no DNS, refused, timed out
        return False


def load_pretrained(what: str, name: str, loader):
    """``loader(name)`` (a ``from_pretrained``) with one clear RuntimeError for every way it can fail.

    ``what`` names the thing in the message ("CLIP model"); ``name`` is a hub id or a local folder.
    """
    from compat import quiet_libraries

    quiet_libraries()  # e.g. the CLIP processor's "requires torchvision" fallback: its PIL version is the reference's
    if not os.path.isdir(os.path.expanduser(name)) and _looks_like_path(name):
        raise RuntimeError(
            f"cannot load the {what} from {name!r}: that folder does not exist. "
            "Pass an existing folder made with save_pretrained or `hf download`, or a hub id."
        )
    try:
        return loader(os.path.expanduser(name))
    except Exception as err:  # offline, missing files, bad folder: all need the same fix
        offline = not os.path.isdir(os.path.expanduser(name)) and (_offline() or not _hub_reachable())
        raise RuntimeError(
            f"cannot load the {what} {name!r}"
            + (" (offline: the hub is unreachable or HF_HUB_OFFLINE is set, so only the local cache was searched)" if offline else "")
            + f" ({type(err).__name__}: {err}). "
            f"On a machine with network run `hf download {name}` (older huggingface_hub: "
            f"`huggingface-cli download {name}`) to fill the Hugging Face cache, "
            "or pass a local folder holding the files instead of the hub id."
        ) from err


def clip_pixel_values(images: torch.Tensor, image_processor) -> torch.Tensor:
    """CLIP's input (N, 3, h, w) from images (N, 3, H, W) in [0, 1] as the reference's CLIP score prepares it
    (flow_grpo/clip_scorer.py: torchvision Resize, CenterCrop and Normalize built from the processor's config, applied
    to the FLOAT pixels): the short side resized to size["shortest_edge"] (the long side to int(short·long/short_side),
    torchvision's rule) by bilinear interpolation with antialiasing (torchvision's tensor Resize is
    F.interpolate(..., antialias=True) since 0.17; the reference pins 0.21), the centre crop_size cut out (top =
    round((H − h)/2)), then (x − mean)/std. The processor's own path rounds to 8 bits and resizes bicubically (PIL)."""
    x = images.detach().float()
    if image_processor.do_resize:
        size, (h, w) = image_processor.size, x.shape[-2:]
        if "shortest_edge" in size:
            short = size["shortest_edge"]
            hw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        else:
            hw = (size["height"], size["width"])
        x = torch.nn.functional.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)
    if image_processor.do_center_crop:
        (h, w), ch, cw = x.shape[-2:], image_processor.crop_size["height"], image_processor.crop_size["width"]
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        x = x[..., top : top + ch, left : left + cw]
    if image_processor.do_normalize:
        mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device)[:, None, None] for v in
                     (image_processor.image_mean, image_processor.image_std))  # fmt: skip
        x = (x - mean) / std
    return x


class ClipReward:
    """Scores images against their prompts with a CLIP model.

    ``score = logit_scale.exp() * cosine(image_embedding, text_embedding) / divisor``:
    the model's own logit (its learned temperature, 100 for PickScore_v1 and
    CLIP ViT-L/14, times the cosine), divided as the reference divides it
    (26 for PickScore, 30 for the CLIP score).

    The model and processor are loaded on the first call, put in eval mode on
    ``device``, and run without gradients: rewards are a black box to GRPO.
    """

    def __init__(self, model_id: str, processor_id: str | None = None, device="cpu", divisor: float = 1.0,
                 float_pixels: bool = False):  # fmt: skip
        self.float_pixels = float_pixels  # clip_pixel_values (the reference's CLIP score) instead of the PIL processor
        self.model_id = str(model_id)
        # Why the fallback: most CLIP checkpoints ship their own processor files.
        self.processor_id = str(processor_id) if processor_id is not None else self.model_id
        self.device = torch.device(device)
        self.divisor = divisor
        self.model = None
        self.processor = None

    def _load_one(self, what: str, name: str, loader):
        return load_pretrained(f"CLIP {what}", name, loader)

    def _load(self) -> None:
        from transformers import AutoProcessor, CLIPModel

        model = self._load_one("model", self.model_id, _cache_first(CLIPModel.from_pretrained))
        self.processor = self._load_one("processor", self.processor_id, _cache_first(AutoProcessor.from_pretrained))
        self.model = model.eval().requires_grad_(False).to(self.device)

    @staticmethod
    def _embedding(output) -> torch.Tensor:
        # Why: transformers < 5 returns the projected embedding itself; 5.x
        # returns an output object that carries it as pooler_output.
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    @torch.no_grad()
    def __call__(self, images, prompts, metadata) -> torch.Tensor:
        if self.model is None:
            self._load()
        if self.float_pixels:  # the reference's CLIP score: torchvision's transforms on the float pixels
            pixels = clip_pixel_values(images, self.processor.image_processor)
        else:  # PickScore as the reference scores it: the processor on 8-bit PIL images
            pixels = self.processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        text = self.processor(
            text=list(prompts),
            padding=True,
            # Why truncate: CLIP's text encoder has a fixed number of positions (77).
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        )
        dtype = next(self.model.parameters()).dtype
        image_emb = self._embedding(self.model.get_image_features(pixel_values=pixels.to(self.device, dtype)))
        text_emb = self._embedding(
            self.model.get_text_features(
                input_ids=text["input_ids"].to(self.device),
                attention_mask=text["attention_mask"].to(self.device),
            )
        )
        cosine = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
        return _as_scores(self.model.logit_scale.exp().float() * cosine / self.divisor)

    def __repr__(self) -> str:
        return f"ClipReward(model_id={self.model_id!r}, processor_id={self.processor_id!r}, device='{self.device}')"


def pickscore(device="cpu", model_id: str = PICKSCORE_MODEL, processor_id: str = PICKSCORE_PROCESSOR) -> ClipReward:
    """Build the PickScore reward: predicted human preference for the image given the prompt.

    RANGE: ``logit_scale.exp() * cosine / 26`` (the reference's scale): the raw
    PickScore (about 18 to 24 for SD-class images, differences of ~1 meaningful)
    divided by 26, so about 0.7 to 0.95. ``model_id``/``processor_id`` accept hub
    ids or local folders.
    """
    return ClipReward(model_id, processor_id, device=device, divisor=PICKSCORE_DIVISOR)


def clipscore(device="cpu", model_id: str = CLIPSCORE_MODEL, processor_id: str | None = None) -> ClipReward:
    """Build the CLIP score reward: cosine similarity of CLIP image and prompt embeddings.

    RANGE: ``logit_scale.exp() * cosine / 30`` (the reference's scale); for CLIP
    ViT-L/14 (scale 100) matching pairs have cosines of 0.25 to 0.40 (score 0.8 to
    1.3) and unrelated pairs 0.10 to 0.20. ``processor_id`` defaults to ``model_id``.
    """
    return ClipReward(model_id, processor_id, device=device, divisor=CLIPSCORE_DIVISOR, float_pixels=True)


# --------------------------------------------------------------------------
# GenEval -- the right objects, in the right number, colour and place?
# --------------------------------------------------------------------------
#
# GenEval (Ghosh et al. 2023, github.com/djghosh13/geneval) scores an image
# against structured metadata, e.g. for "a photo of a red cup and a blue book"
#     {"tag": "color_attr", "include": [{"class": "cup", "count": 1, "color": "red"},
#                                       {"class": "book", "count": 1, "color": "blue"}]}
# An instance-segmentation model (Mask2Former, COCO's 80 classes) finds the
# objects, CLIP names the colour of each, and fixed rules compare counts,
# colours and relative positions with the metadata. Two rule sets, one
# detector output:
#   geneval_correct  the benchmark's all-or-nothing verdict (evaluate() in
#                    geneval's evaluation/evaluate_images.py); the paper's
#                    GenEval number is its accuracy averaged over the six tags;
#   geneval_score    the reward server Flow-GRPO trains on (evaluate_reward()
#                    in yifan123/reward-server, reward_server/gen_eval.py):
#                    a partial-credit score (the training reward) and its own
#                    stricter all-correct flag (exact counts, no "exclude").
# The rules are pure functions of the detections; GenevalReward runs the models.
#
# Where this differs from the official scorer, and why:
# * Detector weights: transformers' facebook/mask2former-swin-small-coco-instance
#   (the Mask2Former authors' own COCO model, converted) instead of
#   mmdetection's mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth: same
#   architecture, backbone and classes, but a different training run, so
#   detections (and scores) differ somewhat; mmdetection is not one of our packages.
#   Pre- and post-processing follow mmdetection's test path (below), not
#   transformers' post_process_instance_segmentation (which works at 384 px).
# * The detector's input is resized by torch's bilinear interpolation, not
#   OpenCV's: the same interpolation, rounded differently, so a pixel can differ
#   by one 8-bit level (the tests bound it against PIL's bilinear).
# * CLIP ViT-L/14 (OpenAI weights) through transformers' CLIPModel and CLIP
#   image processor instead of open_clip; the same weights and preprocessing
#   (bicubic resize of the short side to 224, centre crop), run in float32
#   rather than open_clip's autocast.
# * The reference trainer sends images to the server as JPEG (quality 75); we
#   score the 8-bit image itself, as the benchmark scores PNG files.

GENEVAL_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
# The same weights GenEval loads with open_clip.create_model_and_transforms("ViT-L-14", pretrained="openai").
GENEVAL_CLIP = CLIPSCORE_MODEL

# The detector's 80 labels in COCO's order, under GenEval's names. GenEval's
# object_names.txt renames three COCO classes (mouse -> computer mouse,
# remote -> tv remote, keyboard -> computer keyboard) and keeps COCO's order,
# since the reference reads the detector's per-class outputs by position in it.
GENEVAL_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
GENEVAL_RELATIONS = ("left of", "right of", "above", "below")
# CLIP prompts for zero-shot colour naming; {object} is the class name.
GENEVAL_COLOR_TEMPLATES = (
    "a photo of a {color} {object}",
    "a photo of a {color}-colored {object}",
    "a photo of a {color} object",
)

# GenEval's rule constants (the defaults of evaluate_images.py, also used by the reward server):
GENEVAL_THRESHOLD = 0.3  # keep detections whose confidence is above this ...
# ... or above this for counting prompts (a higher bar: every spurious or duplicate detection makes a count wrong).
GENEVAL_COUNTING_THRESHOLD = 0.9
GENEVAL_MAX_OBJECTS = 16  # per class, the most confident detections kept
GENEVAL_DEAD_ZONE = 0.1  # centre offsets shrink by this fraction of the two boxes' summed sizes
GENEVAL_DIRECTION = 0.5  # a relation holds if the shrunk offset / |offset| passes ±0.5 on its axis (within 60°)
GENEVAL_GREY = (153, 153, 153)  # "#999": the background CLIP sees around an object's mask

# mmdetection's test pipeline for GenEval's Mask2Former config: resize keeping
# the aspect ratio to fit 1333 x 800 (long x short edge), normalise with
# ImageNet's mean/std in 0..255 units, pad right and bottom to a multiple of 32
# (the Swin backbone downsamples by 32); then keep the 100 best (query, class)
# pairs per image (test_cfg.max_per_image).
DETECTOR_SCALE = (1333, 800)
DETECTOR_MEAN = (123.675, 116.28, 103.53)
DETECTOR_STD = (58.395, 57.12, 57.375)
DETECTOR_PAD = 32
DETECTOR_TOP_K = 100


@dataclass(frozen=True)
class Detection:
    """One detected object, as the GenEval rules see it."""

    box: tuple[float, float, float, float]  # (x1, y1, x2, y2) in pixels; x2, y2 one past the mask's last pixel
    score: float  # the detector's confidence, in [0, 1]
    color: str | None = None  # CLIP's colour name; set only where a rule asks (see geneval_colors_needed)


def check_geneval_metadata(prompt: str, metadata: dict) -> None:
    """Raise a ValueError naming the prompt if ``metadata`` is not GenEval metadata the rules can score."""

    def bad(what: str):
        return ValueError(
            f"geneval metadata for prompt {prompt!r}: {what}. Each prompt needs "
            '{"tag": ..., "include": [{"class": ..., "count": ...}, ...]} as in prompts/geneval.jsonl '
            "(format in prompts/README.md)"
        )

    if not isinstance(metadata, dict):
        raise bad(f"expected a dict, got {type(metadata).__name__}")
    if metadata.get("tag") not in GENEVAL_TAGS:
        raise bad(f"'tag' must be one of {', '.join(GENEVAL_TAGS)}, got {metadata.get('tag')!r}")
    include = metadata.get("include")
    if not isinstance(include, list) or not include:
        raise bad("'include' must be a non-empty list of objects")
    for i, req in enumerate(include + list(metadata.get("exclude", []))):
        where = f"include[{i}]" if i < len(include) else f"exclude[{i - len(include)}]"
        if not isinstance(req, dict) or req.get("class") not in GENEVAL_CLASSES:
            raise bad(f"{where} needs a 'class' among the detector's 80 COCO classes, got {req!r}")
        count = req.get("count")
        # Why at most 16: no more than GENEVAL_MAX_OBJECTS detections per class are kept.
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= GENEVAL_MAX_OBJECTS:
            raise bad(f"{where} 'count' must be an integer from 1 to {GENEVAL_MAX_OBJECTS}, got {count!r}")
        if "color" in req and req["color"] not in GENEVAL_COLORS:
            raise bad(f"{where} 'color' must be one of {', '.join(GENEVAL_COLORS)}, got {req['color']!r}")
        if "position" in req:
            position = req["position"]
            ok = isinstance(position, (list, tuple)) and len(position) == 2 and position[0] in GENEVAL_RELATIONS
            if not ok or not isinstance(position[1], int) or not 0 <= position[1] < i:
                raise bad(
                    f"{where} 'position' must be [relation, index] with relation in {GENEVAL_RELATIONS} "
                    f"and index pointing at an earlier include entry, got {position!r}"
                )


def select_detections(labels, scores, threshold: float, max_objects=GENEVAL_MAX_OBJECTS) -> dict[str, list[int]]:
    """GenEval's filter: for each class, the indices of its detections with ``score > threshold``,
    most confident first, at most ``max_objects`` of them. ``labels[i]`` is an index into GENEVAL_CLASSES."""
    by_class: dict[str, list[int]] = {}
    for i, (label, score) in enumerate(zip(labels, scores)):
        if float(score) > threshold:
            by_class.setdefault(GENEVAL_CLASSES[int(label)], []).append(i)
    # Why a stable sort on -score: the most confident first, ties in detector order.
    return {name: sorted(idx, key=lambda i: -float(scores[i]))[:max_objects] for name, idx in by_class.items()}


def relative_position(box_a, box_b) -> set[str]:
    """Where box A lies relative to box B: a subset of {"left of", "right of", "above", "below"}.

    With centres c, sizes s = (width, height) and o = c_A − c_B (image y points down):
        o'  = sign(o) · max(|o| − 0.1 · (s_A + s_B), 0)      per axis: a dead zone around B
        (dx, dy) = o' / |o|
        left of: dx < −0.5,  right of: dx > 0.5,  above: dy < −0.5,  below: dy > 0.5
    and no relation at all when both components of o' are (almost) zero.
    """
    a = torch.as_tensor(box_a, dtype=torch.float64)[:4].view(2, 2)  # rows: (x1, y1), (x2, y2)
    b = torch.as_tensor(box_b, dtype=torch.float64)[:4].view(2, 2)
    offset = a.mean(0) - b.mean(0)  # (2,) centre of A minus centre of B
    sizes = (a[1] - a[0]).abs() + (b[1] - b[0]).abs()  # (2,) summed widths, summed heights
    shrunk = offset.sign() * (offset.abs() - GENEVAL_DEAD_ZONE * sizes).clamp(min=0)
    # Why 1e-3 (GenEval's value): inside the dead zone on both axes the objects overlap; no direction.
    if bool((shrunk.abs() < 1e-3).all()):
        return set()
    dx, dy = (shrunk / offset.norm()).tolist()
    relations = set()
    if dx < -GENEVAL_DIRECTION:
        relations.add("left of")
    if dx > GENEVAL_DIRECTION:
        relations.add("right of")
    if dy < -GENEVAL_DIRECTION:
        relations.add("above")
    if dy > GENEVAL_DIRECTION:
        relations.add("below")
    return relations


def geneval_colors_needed(detections: dict[str, list[Detection]], metadata: dict) -> dict[str, int]:
    """{class: n}: the rules read the colour of the n most confident detections of each such class.

    Both rule sets name colours only for a requirement with a "color" whose class was
    found at least "count" times, and then only for the first "count" detections.
    """
    needed: dict[str, int] = {}
    for req in metadata["include"]:
        name, count = req["class"], req["count"]
        if "color" in req and len(detections.get(name, [])) >= count:
            needed[name] = max(needed.get(name, 0), count)
    return needed


def _colors_of(found: list[Detection], name: str) -> list[str]:
    if any(d.color is None for d in found):
        raise ValueError(f"a {name!r} detection has no colour; name colours first (see geneval_colors_needed)")
    return [d.color for d in found]


def _all_in_relation(found: list[Detection], relation: str, targets: list[Detection]) -> bool:
    """Every found object stands in ``relation`` to every target object."""
    return all(relation in relative_position(d.box, t.box) for d in found for t in targets)


def geneval_correct(detections: dict[str, list[Detection]], metadata: dict) -> bool:
    """The GenEval benchmark's verdict for one image (evaluate() in geneval's evaluate_images.py).

    ``detections`` maps a class to its kept detections, most confident first
    (:func:`select_detections`). Correct if every "include" requirement holds and
    no "exclude" one is violated:
    * count: at least ``count`` detections of the class (more are allowed: counting
      prompts forbid them through an exclude entry with ``count + 1``);
    * color: the ``count`` most confident detections all have that colour;
    * position [relation, k]: each of those stands in ``relation`` to each object of
      include[k], which must itself have been satisfied;
    * exclude {class, count}: fewer than ``count`` detections of the class.
    """
    correct = True
    groups: list[list[Detection] | None] = []  # per include entry: its objects if satisfied, else None
    for req in metadata["include"]:
        name, count = req["class"], req["count"]
        found = detections.get(name, [])[:count]
        matched = len(found) >= count
        if matched and "color" in req:
            matched = _colors_of(found, name).count(req["color"]) >= count
        if matched and "position" in req:
            relation, target = req["position"]
            matched = groups[target] is not None and _all_in_relation(found, relation, groups[target])
        correct = correct and matched
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        if len(detections.get(req["class"], [])) >= req["count"]:
            correct = False
    return correct


def _count_credit(expected: int, found: int) -> float:
    """1 − |expected − found| / expected: 1 when exact, falling by 1/expected per object too many or too few.

    Negative when more than 2·expected objects are found (the reference does not clip it).
    """
    return 1.0 - abs(expected - found) / expected


def geneval_score(detections: dict[str, list[Detection]], metadata: dict) -> tuple[bool, float]:
    """(strict_correct, score) for one image: the reward server's evaluate_reward().

    ``score`` (the training reward) is the mean of the credits below, one or more per include entry:
    * count:    1 − |count − n| / count, with n = all kept detections of the class (≤ 16);
    * if n ≠ count and the entry asks a colour or position: one more credit of 0;
    * color:    1 − |count − m| / count, m = how many of the n detections have the colour;
    * position: 0 if the target entry failed; otherwise 1, preceded by a 0 if some
      (object, target) pair is not in the relation. (This extra 1 after a failure is
      how the reference computes it; we keep it so the reward equals the one Flow-GRPO
      trained on: a failed position check on two single objects scores 3/4, not 2/3.)
    ``strict_correct``: every count exact, every colour and position right; "exclude" is not read.
    RANGE of score: [−14, 1] (−14: one object asked for, 16 found); negative only when a
    class is found more than twice as often as asked.
    """
    strict = True
    credits: list[float] = []
    groups: list[list[Detection] | None] = []
    for req in metadata["include"]:
        name, count = req["class"], req["count"]
        found = detections.get(name, [])
        credits.append(_count_credit(count, len(found)))
        matched = len(found) == count
        if not matched and ("color" in req or "position" in req):
            credits.append(0.0)
        if matched and "color" in req:
            right = _colors_of(found, name).count(req["color"])
            credits.append(_count_credit(count, right))
            matched = right == count
        if matched and "position" in req:
            relation, target = req["position"]
            if groups[target] is None:
                matched = False
                credits.append(0.0)
            else:
                if not _all_in_relation(found, relation, groups[target]):
                    matched = False
                    credits.append(0.0)
                credits.append(1.0)
        strict = strict and matched
        groups.append(found if matched else None)
    return strict, sum(credits) / len(credits) if credits else 0.0


def detector_input(pixels: torch.Tensor, scale=DETECTOR_SCALE) -> tuple[torch.Tensor, tuple[int, int]]:
    """mmdetection's test preprocessing: 8-bit images (N, 3, H, W) -> (pixel_values (N, 3, H', W'), (h, w)).

    Resize keeping the aspect ratio by f = min(long / max(H, W), short / min(H, W)) for
    ``scale = (long, short)`` to (h, w) = (int(H·f + 0.5), int(W·f + 0.5)), round to 8 bits as
    OpenCV's uint8 resize does, normalise (x − mean) / std, pad with zeros to multiples of 32.
    """
    height, width = pixels.shape[-2:]
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    h, w = int(height * factor + 0.5), int(width * factor + 0.5)
    x = torch.nn.functional.interpolate(pixels.float(), size=(h, w), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255)  # (N, 3, h, w)
    mean = torch.tensor(DETECTOR_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(DETECTOR_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    pad_h, pad_w = -h % DETECTOR_PAD, -w % DETECTOR_PAD
    return torch.nn.functional.pad(x, (0, pad_w, 0, pad_h)), (h, w)  # (N, 3, h + pad_h, w + pad_w)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes (x1, y1, x2, y2) of binary masks (K, H, W) -> (K, 4) float; x2, y2 one past the last
    pixel, all zeros for an empty mask (mmdetection's mask2bbox)."""
    cols, rows = masks.any(dim=1), masks.any(dim=2)  # (K, W), (K, H)
    width, height = cols.shape[1], rows.shape[1]
    # Why argmax: it returns the first index of the maximum, i.e. the first True.
    x1, y1 = cols.byte().argmax(1), rows.byte().argmax(1)  # (K,)
    x2, y2 = width - cols.flip(1).byte().argmax(1), height - rows.flip(1).byte().argmax(1)  # (K,)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()  # (K, 4)
    return boxes * cols.any(1, keepdim=True)  # zero the empty ones


def detector_instances(class_logits, mask_logits, input_hw, resized_hw, image_hw, threshold: float):
    """One image's Mask2Former output -> its instances that can pass ``threshold`` (mmdetection's
    instance post-processing, as GenEval's detector runs it).

    class_logits (Q, C+1) with the last class "no object"; mask_logits (Q, h/4, w/4) for the padded
    input of size ``input_hw``, whose top-left ``resized_hw`` is the image. Returns labels (K,),
    scores (K,), masks (K, H, W) bool at the image's size ``image_hw``, boxes (K, 4).
        p(query, class) = softmax(class_logits)[:, :C]; keep the 100 best (query, class) pairs
        mask = upsampled mask logit > 0
        score = p · mean(sigmoid(mask logit) over the mask)
    """
    probs = class_logits.float().softmax(-1)[:, :-1]  # (Q, C)
    num_classes = probs.shape[1]
    top_p, top_index = probs.flatten().topk(min(DETECTOR_TOP_K, probs.numel()))  # (100,)
    # Exact shortcut: score = p · (a mean of sigmoids, < 1) < p, so a pair with p <= threshold can never
    # pass the rules' filter; skipping it saves upsampling its mask.
    keep = top_p > threshold
    top_p, top_index = top_p[keep], top_index[keep]  # (K,)
    labels, queries = top_index % num_classes, top_index // num_classes
    if len(queries) == 0:
        empty = torch.zeros(0, *image_hw, dtype=torch.bool, device=probs.device)
        return labels, top_p, empty, mask_boxes(empty)
    logits = mask_logits[queries].float().unsqueeze(0)  # (1, K, h/4, w/4)
    logits = torch.nn.functional.interpolate(logits, size=input_hw, mode="bilinear", align_corners=False)
    logits = logits[:, :, : resized_hw[0], : resized_hw[1]]  # drop the padding
    logits = torch.nn.functional.interpolate(logits, size=image_hw, mode="bilinear", align_corners=False)[0]
    masks = logits > 0  # (K, H, W)
    inside = masks.flatten(1).float()  # (K, H*W)
    # Why + 1e-6: mmdetection's guard for an empty mask (its score becomes 0).
    mask_score = (logits.sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)  # (K,)
    return labels, top_p * mask_score, masks, mask_boxes(masks)


def masked_crop(image: torch.Tensor, mask: torch.Tensor, box) -> Image.Image:
    """The object alone, as GenEval shows it to CLIP: the 8-bit image (3, H, W) inside ``mask`` (H, W),
    GenEval's grey (#999) outside, cropped to ``box`` (rounded to whole pixels, as PIL's crop does)."""
    grey = torch.tensor(GENEVAL_GREY, dtype=image.dtype, device=image.device).view(3, 1, 1)
    composite = torch.where(mask.to(image.device), image, grey)  # (3, H, W)
    x1, y1, x2, y2 = (int(round(float(v))) for v in box[:4])
    return Image.fromarray(composite[:, y1:y2, x1:x2].permute(1, 2, 0).cpu().numpy())


def _offline() -> bool:
    """True if the environment asks for no hub access (read now, not when huggingface_hub was imported)."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(flag.strip().upper() in ("1", "ON", "YES", "TRUE") for flag in flags)


def _cache_first(from_pretrained):
    """Wrap ``from_pretrained``: try the local files and cache first, the hub only if that fails,
    HF_HUB_OFFLINE is not set and the hub is reachable (:func:`_hub_reachable`).

    Why: without network, huggingface_hub retries each file for ~25 s, so a missing model
    costs minutes before its error; a cache-only attempt fails in milliseconds.
    """

    def load(name):
        try:
            return from_pretrained(name, local_files_only=True)
        except OSError:
            if _offline() or os.path.isdir(name) or not _hub_reachable():  # the hub cannot help
                raise
            return from_pretrained(name)

    return load


def _mask2former_class():
    """Mask2FormerForUniversalSegmentation without its training loss.

    Why: its constructor builds the Hungarian-matching loss, which needs scipy (not one of our
    packages); scoring never computes a loss. Same parameters, same forward.
    """
    from torch import nn
    from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerModel

    class Mask2FormerForInference(Mask2FormerForUniversalSegmentation):
        def __init__(self, config):
            super(Mask2FormerForUniversalSegmentation, self).__init__(config)  # the pretrained-model base
            self.model = Mask2FormerModel(config)
            self.class_predictor = nn.Linear(config.hidden_dim, config.num_labels + 1)
            self.post_init()

    return Mask2FormerForInference


class GenevalReward:
    """GenEval through transformers: Mask2Former finds the objects, CLIP names colours, the rules score.

    ``reward(images, prompts, metadata)`` -> the partial-credit score (:func:`geneval_score`), (N,);
    ``details(...)`` -> (that score, {"strict", "correct", "strict/<tag>", "correct/<tag>": (N,)}):
    1/0 per image for the reward server's strict flag and for the benchmark's verdict
    (:func:`geneval_correct`), and the same again under the image's tag (NaN under the other tags).
    RANGE of the score: [−14, 1]; negative only when a class is found more than twice as often
    as asked (see :func:`geneval_score`). The ids accept hub ids or local folders;
    ``clip_processor_id`` defaults to ``clip_model_id``. Models are loaded on the first call,
    in eval mode on ``device``, in float32.
    """

    def __init__(
        self,
        device="cpu",
        detector_id: str = GENEVAL_DETECTOR,
        clip_model_id: str = GENEVAL_CLIP,
        clip_processor_id: str | None = None,
        batch_size: int = 16,
        scale=DETECTOR_SCALE,
    ):
        self.device = torch.device(device)
        self.detector_id = str(detector_id)
        self.clip_model_id = str(clip_model_id)
        self.clip_processor_id = str(clip_processor_id) if clip_processor_id is not None else self.clip_model_id
        self.batch_size = int(batch_size)  # images per detector forward: bounds GPU memory
        self.scale = tuple(scale)  # (long, short) edge the detector sees; see detector_input
        self.detector = self.clip = self.processor = None
        self._color_classifiers: dict[str, torch.Tensor] = {}  # class -> (10, D) text directions

    def _load(self) -> None:
        from transformers import AutoProcessor, CLIPModel

        # The detector first: it is the likeliest to be missing, and one failure is enough.
        loader = _cache_first(_mask2former_class().from_pretrained)
        detector = load_pretrained("GenEval detector (Mask2Former)", self.detector_id, loader)
        if detector.config.num_labels != len(GENEVAL_CLASSES):
            raise RuntimeError(
                f"the GenEval detector {self.detector_id!r} has {detector.config.num_labels} classes, but the "
                f"rules need COCO's {len(GENEVAL_CLASSES)}: pass a COCO instance-segmentation Mask2Former "
                f"such as {GENEVAL_DETECTOR}"
            )
        clip = load_pretrained("CLIP model", self.clip_model_id, _cache_first(CLIPModel.from_pretrained))
        loader = _cache_first(AutoProcessor.from_pretrained)
        self.processor = load_pretrained("CLIP processor", self.clip_processor_id, loader)
        self.detector = detector.eval().requires_grad_(False).to(self.device)
        self.clip = clip.eval().requires_grad_(False).to(self.device)

    def _detect(self, pixels: torch.Tensor, metadata: list[dict]):
        """Per image: ({class: [Detection]}, {class: (n, H, W) masks}), kept as the rules keep them."""
        found = []
        for start in range(0, len(pixels), self.batch_size):
            chunk = pixels[start : start + self.batch_size].to(self.device)  # (b, 3, H, W) uint8
            inputs, resized_hw = detector_input(chunk, self.scale)  # (b, 3, H', W')
            out = self.detector(pixel_values=inputs)
            for i in range(len(chunk)):
                tag = metadata[start + i]["tag"]
                threshold = GENEVAL_COUNTING_THRESHOLD if tag == "counting" else GENEVAL_THRESHOLD
                labels, scores, masks, boxes = detector_instances(
                    out.class_queries_logits[i], out.masks_queries_logits[i], tuple(inputs.shape[-2:]),
                    resized_hw, tuple(chunk.shape[-2:]), threshold,
                )  # fmt: skip
                chosen = select_detections(labels.tolist(), scores.tolist(), threshold)
                detections = {
                    name: [Detection(tuple(boxes[j].tolist()), float(scores[j])) for j in idx]
                    for name, idx in chosen.items()
                }
                found.append((detections, {name: masks[idx] for name, idx in chosen.items()}))
        return found

    def _color_classifier(self, name: str) -> torch.Tensor:
        """(10, D): per colour, the normalised mean of the normalised CLIP embeddings of its three prompts."""
        if name not in self._color_classifiers:
            texts = [t.format(color=c, object=name) for c in GENEVAL_COLORS for t in GENEVAL_COLOR_TEMPLATES]
            tokens = self.processor(text=texts, padding=True, return_tensors="pt")
            ids, attention = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
            emb = ClipReward._embedding(self.clip.get_text_features(input_ids=ids, attention_mask=attention))
            emb = torch.nn.functional.normalize(emb.float(), dim=-1)  # (30, D), colour-major
            emb = emb.view(len(GENEVAL_COLORS), len(GENEVAL_COLOR_TEMPLATES), -1).mean(1)  # (10, D)
            self._color_classifiers[name] = torch.nn.functional.normalize(emb, dim=-1)
        return self._color_classifiers[name]

    def _name_colors(self, pixels: torch.Tensor, found, metadata: list[dict]) -> list[dict[str, list[Detection]]]:
        """Fill in ``color`` where the rules will read it; all crops of the batch go through CLIP at once."""
        wanted = []  # (image, class, rank)
        for i, ((detections, _), meta) in enumerate(zip(found, metadata)):
            for name, n in geneval_colors_needed(detections, meta).items():
                wanted += [(i, name, j) for j in range(n)]
        result = [dict(detections) for detections, _ in found]
        if not wanted:
            return result
        crops = [masked_crop(pixels[i], found[i][1][name][j], found[i][0][name][j].box) for i, name, j in wanted]
        pixel_values = self.processor(images=crops, return_tensors="pt")["pixel_values"]
        dtype = next(self.clip.parameters()).dtype
        emb = ClipReward._embedding(self.clip.get_image_features(pixel_values=pixel_values.to(self.device, dtype)))
        emb = torch.nn.functional.normalize(emb.float(), dim=-1)  # (n_crops, D)
        for (i, name, j), e in zip(wanted, emb):
            color = GENEVAL_COLORS[int((self._color_classifier(name) @ e).argmax())]  # nearest colour direction
            result[i][name] = list(result[i][name])
            result[i][name][j] = replace(result[i][name][j], color=color)
        return result

    @torch.no_grad()
    def details(self, images, prompts, metadata) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        metadata = list(metadata) if metadata is not None else [{}] * len(prompts)
        if not len(images) == len(prompts) == len(metadata):
            raise ValueError(f"geneval got {len(images)} images, {len(prompts)} prompts, {len(metadata)} metadata")
        for prompt, meta in zip(prompts, metadata):  # fail on bad metadata before running any model
            check_geneval_metadata(prompt, meta)
        if self.detector is None:
            self._load()
        pixels = to_uint8(images)  # (N, 3, H, W)
        detections = self._name_colors(pixels.cpu(), self._detect(pixels, metadata), metadata)
        scores, extra = [], {}
        for found, meta in zip(detections, metadata):
            strict, score = geneval_score(found, meta)
            scores.append(score)
            for key, value in (("strict", float(strict)), ("correct", float(geneval_correct(found, meta)))):
                extra.setdefault(key, []).append(value)
                for tag in GENEVAL_TAGS:  # every tag key for every image: the same keys in every batch
                    extra.setdefault(f"{key}/{tag}", []).append(value if tag == meta["tag"] else math.nan)
        return _as_scores(scores), {key: _as_scores(values) for key, values in extra.items()}

    def __call__(self, images, prompts, metadata) -> torch.Tensor:
        return self.details(images, prompts, metadata)[0]

    def __repr__(self) -> str:
        ids = f"detector_id={self.detector_id!r}, clip_model_id={self.clip_model_id!r}"
        return f"GenevalReward({ids}, device='{self.device}')"


# The registry's factory: geneval(device, detector_id=..., clip_model_id=..., ...) builds a GenevalReward.
geneval = GenevalReward


# --------------------------------------------------------------------------
# Registry and weighted sums
# --------------------------------------------------------------------------


def _stateless(reward):
    """Factory for a reward that needs no model: the device is irrelevant, the function is the reward."""

    def factory(device="cpu"):
        return reward

    factory.__doc__ = reward.__doc__
    return factory


# name -> factory(device="cpu", **options) -> reward callable
REWARDS = {
    "jpeg_compressibility": _stateless(jpeg_compressibility),
    "jpeg_incompressibility": _stateless(jpeg_incompressibility),
    "ocr": _stateless(ocr),
    "pickscore": pickscore,
    "clipscore": clipscore,
    "geneval": geneval,
}


def parse_spec(spec: str) -> dict[str, float]:
    """Parse ``"name"`` or ``"name=weight,name=weight"`` into ``{name: weight}``.

    A name without ``=weight`` gets weight 1. A weight of 0 is allowed: that
    reward is still computed and can be logged, but does not affect training.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty reward spec {spec!r}; write e.g. 'pickscore' or 'ocr=0.5,pickscore=0.5'")
    weights: dict[str, float] = {}
    for item in spec.split(","):
        name, sep, weight_text = (part.strip() for part in item.partition("="))
        if not name:
            raise ValueError(
                f"reward spec {spec!r} has an empty entry {item!r}; "
                "write comma-separated name=weight pairs, e.g. 'ocr=0.5,pickscore=0.5'"
            )
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r} in spec {spec!r}; valid names: {', '.join(sorted(REWARDS))}")
        if name in weights:
            raise ValueError(f"reward {name!r} appears twice in spec {spec!r}; give each reward once")
        weight = 1.0
        if sep:
            try:
                weight = float(weight_text)
            except ValueError:
                raise ValueError(
                    f"bad weight {weight_text!r} for reward {name!r} in spec {spec!r}; weights are numbers, e.g. ocr=0.5"
                ) from None
            if not math.isfinite(weight):
                raise ValueError(f"weight for reward {name!r} in spec {spec!r} must be finite, got {weight_text!r}")
        weights[name] = weight
    return weights


class WeightedReward:
    """A weighted sum of named rewards that also reports each component.

    ``components(images, prompts, metadata)`` -> ``{name: (N,) float32 tensor}``, plus
    ``{"name/key": (N,)}`` diagnostics for a reward that has a ``details(images, prompts, metadata)
    -> (scores, {key: (N,)})`` method (called instead of the reward itself, so its models run once;
    entries may be NaN where they do not apply, e.g. ``geneval/strict/counting`` for other tags);
    ``combine(components)`` -> ``sum(weight * component)`` over the named rewards only, shape (N,);
    ``__call__`` = ``combine(components(...))``.
    """

    def __init__(self, rewards: dict, weights: dict[str, float]):
        if set(rewards) != set(weights):
            raise ValueError(f"rewards {sorted(rewards)} and weights {sorted(weights)} must name the same rewards")
        self.rewards = dict(rewards)
        self.weights = dict(weights)

    def components(self, images, prompts, metadata) -> dict[str, torch.Tensor]:
        parts = {}
        for name, reward in self.rewards.items():
            if hasattr(reward, "details"):  # one model run gives the score and its diagnostics
                parts[name], extra = reward.details(images, prompts, metadata)
                parts.update({f"{name}/{key}": value for key, value in extra.items()})
            else:
                parts[name] = reward(images, prompts, metadata)
        return parts

    def combine(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        # Only the weighted names count; "name/key" diagnostics are for logging.
        total = sum(self.weights[name] * components[name] for name in self.weights)
        return _as_scores(total)

    def __call__(self, images, prompts, metadata) -> torch.Tensor:
        return self.combine(self.components(images, prompts, metadata))

    def __repr__(self) -> str:
        return "WeightedReward(" + ", ".join(f"{n}={w:g}" for n, w in self.weights.items()) + ")"


def parse_model_options(text: str) -> dict[str, dict[str, str]]:
    """The trainer's ``--reward_models`` string, ``"reward.option=value,..."``, as :func:`build_reward`'s
    overrides: ``"geneval.detector_id=/m/m2f,pickscore.model_id=/m/ps"`` ->
    ``{"geneval": {"detector_id": "/m/m2f"}, "pickscore": {"model_id": "/m/ps"}}`` (local folders or hub ids)."""
    options: dict[str, dict[str, str]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        name, dot, option = key.strip().partition(".")
        if not (sep and dot and name and option and value.strip()):
            raise ValueError(
                f"bad --reward_models entry {item!r}: write reward.option=value, e.g. geneval.detector_id=/models/m2f"
            )
        options.setdefault(name, {})[option.strip()] = value.strip()
    return options


def build_reward(spec: str, device="cpu", **overrides) -> WeightedReward:
    """Build the reward named by ``spec`` (see :func:`parse_spec`) on ``device``.

    ``overrides`` maps a reward name to extra keyword arguments for its factory,
    e.g. ``build_reward("pickscore", pickscore={"model_id": "/models/pickscore"})``.
    Overrides for rewards that are valid but not in ``spec`` are ignored, so a
    trainer can always pass its model paths.
    """
    weights = parse_spec(spec)
    for name, options in overrides.items():
        if name not in REWARDS:
            raise ValueError(f"override for unknown reward {name!r}; valid names: {', '.join(sorted(REWARDS))}")
        if not isinstance(options, dict):
            raise ValueError(f"override for {name!r} must be a dict of keyword arguments, got {options!r}")
    built = {}
    for name in weights:
        try:
            built[name] = REWARDS[name](device=device, **overrides.get(name, {}))
        except TypeError as err:
            raise ValueError(f"bad override for reward {name!r}: {err}") from err
    return WeightedReward(built, weights)


# --------------------------------------------------------------------------
# Calling a reward: the one place that checks what comes back
# --------------------------------------------------------------------------


class RewardError(RuntimeError):
    """The reward function returned something that must not be trained on."""


def check_rewards(rewards: torch.Tensor, n: int, name: str = "reward") -> torch.Tensor:
    """Stop before any update if a reward is NaN/inf or of the wrong shape (training on it would be garbage)."""
    if not torch.is_tensor(rewards) or rewards.shape != (n,):
        shape = tuple(rewards.shape) if torch.is_tensor(rewards) else type(rewards).__name__
        raise RewardError(f"{name} must return a tensor of shape ({n},) for {n} images, got {shape}")
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(f"{name} returned NaN/inf for samples {bad[:10]}; no update was applied")
    return rewards.float().cpu()


def score(reward_fn: Callable, images: torch.Tensor, texts: list[str], meta: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rewards (n,), checked, and what to log beside them {key: (n,)}: for a weighted sum (rewards.WeightedReward)
    each of its rewards (checked too), and the diagnostics a reward adds under "name/key" (NaN where one does not
    apply to a sample, e.g. GenEval's accuracy per prompt tag; logged as the mean over the others)."""
    n = len(texts)
    if not hasattr(reward_fn, "components"):
        return check_rewards(reward_fn(images, texts, meta), n), {}
    parts = reward_fn.components(images, texts, meta)  # every reward model runs once
    several = sum("/" not in k for k in parts) > 1
    logged = {}
    for k, v in parts.items():
        if "/" in k:  # a diagnostic: NaN allowed (not applicable), only its shape is checked
            v = torch.as_tensor(v, dtype=torch.float32).cpu()
            check_rewards(v.nan_to_num(0.0), n, f"reward '{k}'")
            logged[k] = v
        elif several:
            logged[k] = check_rewards(v, n, f"reward '{k}'")
    return check_rewards(reward_fn.combine(parts), n), logged


# Rewards that are continuous functions of the pixels: two different images of one prompt score differently unless
# the reward does not read the image. Not OCR or GenEval: an image without text or objects scores 0, whatever it is.
GRADED_REWARDS = ("jpeg_compressibility", "jpeg_incompressibility", "pickscore", "clipscore")


def check_reward(reward_fn: Callable, cfg, prompts: list) -> None:
    """The trainer's start-up check (cfg: flow_grpo.Config), before the big model loads: every prompt suits the
    reward (OCR: each has a target text), and one call on blank images with the first prompts and their metadata
    loads the reward models and returns valid rewards.
    A graded reward is called again on noise images: if it scores them as the blank ones, it does not read the
    images, so every group would score all alike (every advantage 0): a warning says so."""
    if "ocr" in parse_spec(cfg.reward):
        for p in prompts:
            try:
                ocr_target(p.text, p.metadata)
            except ValueError as e:
                raise ValueError(f"{p.source}: {e}" if p.source else str(e)) from None
    first = prompts[: cfg.batch_size]
    blank = torch.full((len(first), 3, cfg.resolution, cfg.resolution), 0.5)  # (k, 3, H, W) mid-grey
    texts, meta, noise = [p.text for p in first], [p.metadata for p in first], None
    try:
        grey = score(reward_fn, blank, texts, meta)[0]
        if set(parse_spec(cfg.reward)) <= set(GRADED_REWARDS):
            noise = score(reward_fn, torch.rand(blank.shape, generator=torch.Generator().manual_seed(0)), texts, meta)[0]
    except Exception as e:  # a model that cannot load, a missing program, a reward that rejects the metadata
        raise RewardError(f"--reward {cfg.reward} fails on a blank image with the first prompts: {e}") from e
    if noise is not None and torch.equal(noise, grey):
        print(f"warning: --reward {cfg.reward} scores mid-grey images and random noise exactly alike: it does not read "
              f"the images, so every group would score all alike and nothing would be learnt", file=sys.stderr)
