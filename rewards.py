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
for NaN or shapes themselves; the trainer validates what comes back in one place.

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
======================  ======================  ======================================

(The typical values are for 512x512 images; JPEG sizes grow with resolution.)

Why the divisors: they are the reference implementation's (flow_grpo/rewards.py: JPEG -kB/500;
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
  every named reward evaluated once (log these);
* ``reward.combine(components)`` -> the weighted sum, an (N,) tensor (train on it);
* ``reward(images, prompts, metadata)`` is simply ``combine(components(...))``,
  so a WeightedReward obeys the same contract as a single reward.

A trainer that wants both calls ``components`` once, logs the dict, and passes
it to ``combine`` -- no reward model runs twice.

``REWARDS`` maps each name to a *factory* ``factory(device="cpu", **options)``
that returns the reward callable. Model-backed rewards (pickscore, clipscore)
load their weights lazily on the first call, so building any reward is cheap,
and ``import rewards`` itself imports neither transformers nor pytesseract.
"""

from __future__ import annotations

import io
import math
import os
import re
import shutil

import torch
from PIL import Image

__all__ = [
    "REWARDS",
    "ClipReward",
    "WeightedReward",
    "build_reward",
    "clipscore",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "jpeg_size_kb",
    "levenshtein",
    "normalize_text",
    "ocr",
    "ocr_score",
    "ocr_target",
    "parse_spec",
    "pickscore",
    "to_pil",
]


# --------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Convert a (N, 3, H, W) float tensor in [0, 1] to N RGB PIL images.

    Rounding to 8 bits is what happens when a generated image is saved, so the
    image-file based rewards (JPEG, OCR) and the CLIP processors see exactly
    what a person looking at the saved PNG would see.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"rewards expect images of shape (N, 3, H, W), got {tuple(images.shape)}; "
            "decode latents to pixels (values in [0, 1]) before scoring"
        )
    # Why clamp: the VAE decoder can overshoot [0, 1] slightly; uint8 would wrap.
    pixels = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
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
    reference registers only jpeg_compressibility for training; this is its
    mirror image, on the same scale.) Prompts and metadata are ignored.
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


class ClipReward:
    """Scores images against their prompts with a CLIP model.

    ``score = logit_scale.exp() * cosine(image_embedding, text_embedding) / divisor``:
    the model's own logit (its learned temperature, 100 for PickScore_v1 and
    CLIP ViT-L/14, times the cosine), divided as the reference divides it
    (26 for PickScore, 30 for the CLIP score).

    The model and processor are loaded on the first call, put in eval mode on
    ``device``, and run without gradients: rewards are a black box to GRPO.
    """

    def __init__(self, model_id: str, processor_id: str | None = None, device="cpu", divisor: float = 1.0):
        self.model_id = str(model_id)
        # Why the fallback: most CLIP checkpoints ship their own processor files.
        self.processor_id = str(processor_id) if processor_id is not None else self.model_id
        self.device = torch.device(device)
        self.divisor = divisor
        self.model = None
        self.processor = None

    def _load_one(self, what: str, name: str, loader):
        if not os.path.isdir(os.path.expanduser(name)) and _looks_like_path(name):
            raise RuntimeError(
                f"cannot load the CLIP {what} from {name!r}: that folder does not exist. "
                "Pass an existing folder made with save_pretrained or `hf download`, or a hub id."
            )
        try:
            return loader(os.path.expanduser(name))
        except Exception as err:  # offline, missing files, bad folder: all need the same fix
            raise RuntimeError(
                f"cannot load the CLIP {what} {name!r} ({type(err).__name__}: {err}). "
                f"On a machine with network run `hf download {name}` (older huggingface_hub: "
                f"`huggingface-cli download {name}`) to fill the Hugging Face cache, "
                "or pass a local folder holding the files instead of the hub id."
            ) from err

    def _load(self) -> None:
        from transformers import AutoProcessor, CLIPModel

        model = self._load_one("model", self.model_id, CLIPModel.from_pretrained)
        self.processor = self._load_one("processor", self.processor_id, AutoProcessor.from_pretrained)
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
        # Why PIL: the processor's own resize/crop/normalise is what the model
        # was trained with; re-implementing it in torch could drift from it.
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
    return ClipReward(model_id, processor_id, device=device, divisor=CLIPSCORE_DIVISOR)


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

    ``components(images, prompts, metadata)`` -> ``{name: (N,) float32 tensor}``;
    ``combine(components)`` -> ``sum(weight * component)``, shape (N,);
    ``__call__`` = ``combine(components(...))``.
    """

    def __init__(self, rewards: dict, weights: dict[str, float]):
        if set(rewards) != set(weights):
            raise ValueError(f"rewards {sorted(rewards)} and weights {sorted(weights)} must name the same rewards")
        self.rewards = dict(rewards)
        self.weights = dict(weights)

    def components(self, images, prompts, metadata) -> dict[str, torch.Tensor]:
        return {name: reward(images, prompts, metadata) for name, reward in self.rewards.items()}

    def combine(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        total = sum(self.weights[name] * components[name] for name in self.weights)
        return _as_scores(total)

    def __call__(self, images, prompts, metadata) -> torch.Tensor:
        return self.combine(self.components(images, prompts, metadata))

    def __repr__(self) -> str:
        return "WeightedReward(" + ", ".join(f"{n}={w:g}" for n, w in self.weights.items()) + ")"


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
