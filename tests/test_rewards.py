"""Tests for rewards.py, each checked against an independent computation.

No network: the CLIP rewards run on a tiny random CLIP that the tests build
and save to a temporary folder, and OCR reads text that PIL renders here.
"""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import rewards
from tiny_models import save_tiny_clip

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> (1, 3, H, W) float tensor in [0, 1], the rewards' input format."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255).unsqueeze(0)


def smooth_and_noisy(size=128):
    """A gentle horizontal gradient and uniform noise, both (1, 3, size, size)."""
    ramp = torch.linspace(0.2, 0.8, size)
    smooth = ramp.expand(1, 3, size, size).clone()
    noisy = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return smooth, noisy


def find_font(size):
    """A TrueType font at ``size`` px: DejaVu if installed, else Pillow's built-in scalable font."""
    for path in (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    ):
        if os.path.exists(path):
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)  # Pillow >= 10.1


def render_word(word, width=320, height=128):
    """``word`` in large black letters, centred on white, as a (1, 3, H, W) tensor."""
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).text((width // 2, height // 2), word, fill="black", font=find_font(64), anchor="mm")
    return to_tensor(image)


def assert_scores(scores, n):
    assert isinstance(scores, torch.Tensor)
    assert scores.shape == (n,)
    assert scores.dtype == torch.float32
    assert scores.device.type == "cpu"
    assert torch.isfinite(scores).all()


# --------------------------------------------------------------------------
# JPEG
# --------------------------------------------------------------------------


def test_jpeg_smooth_image_is_more_compressible_than_noise():
    smooth, noisy = smooth_and_noisy()
    scores = rewards.jpeg_compressibility(torch.cat([smooth, noisy]), ["", ""], [{}, {}])
    assert_scores(scores, 2)
    assert scores[0] > scores[1]
    assert (scores < 0).all()


def test_jpeg_value_is_minus_kilobytes_of_pil_jpeg_at_quality_95():
    _, noisy = smooth_and_noisy()
    # Independent reference: the same 8-bit pixels, encoded by PIL directly.
    pixels = (noisy[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    expected = -len(buffer.getvalue()) / 1000 / 500  # kB, on the reference's scale (-kB/500)
    assert rewards.jpeg_compressibility(noisy, [""], [{}]).item() == pytest.approx(expected, rel=1e-6)


def test_jpeg_incompressibility_is_exact_negative():
    smooth, noisy = smooth_and_noisy()
    images = torch.cat([smooth, noisy])
    compress = rewards.jpeg_compressibility(images, ["", ""], [{}, {}])
    incompress = rewards.jpeg_incompressibility(images, ["", ""], [{}, {}])
    assert_scores(incompress, 2)
    assert torch.equal(incompress, -compress)


def test_jpeg_accepts_other_dtypes_and_clamps():
    smooth, _ = smooth_and_noisy(64)
    half = rewards.jpeg_compressibility(smooth.half(), [""], [{}])
    assert_scores(half, 1)
    # Values outside [0, 1] (VAE overshoot) are clamped, not wrapped around.
    over = rewards.jpeg_compressibility(torch.full((1, 3, 64, 64), 1.5), [""], [{}])
    white = rewards.jpeg_compressibility(torch.ones(1, 3, 64, 64), [""], [{}])
    assert torch.equal(over, white)


# --------------------------------------------------------------------------
# OCR
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, distance",
    [
        ("", "", 0),
        ("abc", "", 3),
        ("", "abcd", 4),
        ("flow", "flow", 0),
        ("kitten", "sitting", 3),  # k->s, e->i, insert g
        ("flaw", "lawn", 2),  # delete f, insert n
        ("sunday", "saturday", 3),  # insert a, insert t, n->r
        ("grpo", "flow", 4),  # no two letters line up cheaper than 4 substitutions
    ],
)
def test_levenshtein_hand_worked_cases(a, b, distance):
    assert rewards.levenshtein(a, b) == distance
    assert rewards.levenshtein(b, a) == distance  # edit distance is symmetric


def test_normalize_text_lowercases_and_drops_whitespace():
    assert rewards.normalize_text("  Hello,\n  World ") == "hello,world"


@pytest.mark.parametrize(
    "read, target, reward",
    [
        ("OPEN", "open", 1.0),  # case does not count
        ("op en", "OPEN", 1.0),  # nor spaces
        ("openhours", "open", 1.0),  # the target inside other text: distance 0 (the reference's substring rule)
        ("Sale: OPEN now", "open", 1.0),
        ("opne", "open", 0.5),  # 2 edits (swap = 2 substitutions) of 4 letters
        ("ope", "open", 0.75),  # 1 insertion of 4
        ("", "open", 0.0),  # nothing read: 4 edits of 4
        ("xyzxyzxyz", "open", 0.0),  # 9 edits, capped at len(target) = 4: not below 0
        ("pizza", "pi", 1.0),  # substring again
        ("qi", "pi", 0.5),
    ],
)
def test_ocr_score_rule_on_constructed_strings(read, target, reward):
    assert rewards.ocr_score(read, target) == pytest.approx(reward)


@pytest.mark.tesseract  # skipped where the program is missing, unless CI=true (conftest.py)
def test_ocr_reads_rendered_word():
    image = render_word("FLOW")
    images = torch.cat([image, image])
    scores = rewards.ocr(images, ["a sign", "a sign"], [{"text": "FLOW"}, {"text": "GRPO"}])
    assert_scores(scores, 2)
    assert scores[0] >= 0.75
    assert scores[1] < scores[0]


@pytest.mark.tesseract
def test_ocr_target_from_quoted_prompt_and_metadata_precedence():
    image = render_word("FLOW")
    from_prompt = rewards.ocr(image, ['a neon sign that says "Flow" at night'], [{}])
    assert from_prompt.item() >= 0.75
    # metadata["text"] wins over the quoted text in the prompt
    assert rewards.ocr_target('a sign that says "FLOW"', {"text": "GRPO"}) == "GRPO"
    assert rewards.ocr_target("a poster reading \u201cHi there\u201d", {}) == "Hi there"


@pytest.mark.tesseract
def test_ocr_blank_image_scores_zero():
    blank = torch.ones(1, 3, 128, 320)
    assert rewards.ocr(blank, ['"FLOW"'], [{}]).item() == 0.0


def test_ocr_missing_target_raises_naming_the_prompt():
    with pytest.raises(ValueError, match="a cat on a sofa"):
        rewards.ocr(render_word("FLOW"), ["a cat on a sofa"], [{}])


def test_ocr_missing_tesseract_says_how_to_install(monkeypatch):
    import pytesseract

    monkeypatch.setattr(pytesseract.pytesseract, "tesseract_cmd", "/nonexistent/tesseract")
    with pytest.raises(RuntimeError, match="apt-get install tesseract-ocr"):
        rewards.ocr(render_word("FLOW"), ['"FLOW"'], [{}])


# --------------------------------------------------------------------------
# CLIP rewards on a tiny random CLIP
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """Folder with a tiny random CLIPModel, tokenizer and image processor (save_pretrained format)."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


PROMPTS = ["a red cat", "two dogs on grass " * 20, "Hello, World! 42"]  # the second is longer than 77 tokens


def clip_batch():
    return torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(1)), PROMPTS, [{}, {}, {}]


def reference_logits(folder, images, prompts):
    """Independent reference: CLIPModel's own forward pass, whose logits are scale * cosine."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    pil = [Image.fromarray(x) for x in (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()]
    inputs = processor(text=prompts, images=pil, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    return out.logits_per_image.diagonal(), model.logit_scale.exp()


def test_pickscore_on_tiny_clip_matches_clip_logits(tiny_clip):
    reward = rewards.pickscore(model_id=tiny_clip, processor_id=tiny_clip)
    assert reward.model is None  # building is cheap: nothing loaded yet
    images, prompts, metadata = clip_batch()
    scores = reward(images, prompts, metadata)
    assert_scores(scores, 3)
    expected, _ = reference_logits(tiny_clip, images, prompts)
    torch.testing.assert_close(scores, expected / 26, rtol=1e-4, atol=1e-4)  # the reference's scale: logit / 26
    assert not reward.model.training


def antialiased_bilinear(x: torch.Tensor, out: int, dim: int) -> torch.Tensor:
    """Resample `dim` of x to `out` samples by the definition of antialiased bilinear interpolation (PIL's filter,
    which torchvision's Resize(antialias=True) and torch's interpolate(antialias=True) implement): output i is the
    mean of the inputs j weighted by a triangle of half-width max(n/out, 1) input pixels centred at (i + ½)·n/out,
    the weights renormalised to sum 1. Float64, written out, one output at a time."""
    n = x.shape[dim]
    scale = n / out
    support = max(scale, 1.0)
    weights = torch.zeros(out, n, dtype=torch.float64)
    for i in range(out):
        centre = (i + 0.5) * scale
        for j in range(n):
            weights[i, j] = max(0.0, 1 - abs(j + 0.5 - centre) / support)
    weights /= weights.sum(dim=1, keepdim=True)
    return torch.movedim(torch.tensordot(weights, torch.movedim(x.double(), dim, 0), dims=1), 0, dim)


def test_clipscore_preprocesses_the_float_pixels_as_the_reference(tiny_clip):
    """The reference's CLIP score (flow_grpo/clip_scorer.py) runs torchvision's Resize(shortest_edge) (bilinear,
    antialias) / CenterCrop / Normalize on the float pixels, not the processor's 8-bit bicubic PIL path."""
    from transformers import CLIPModel, CLIPProcessor

    images, prompts, metadata = clip_batch()  # (3, 3, 48, 40) in [0, 1]
    image_processor = CLIPProcessor.from_pretrained(tiny_clip).image_processor  # shortest edge 32, crop 32 x 32
    # Resize(32): the short side 40 → 32, the long side 48 → int(32·48/40) = 38; CenterCrop(32): rows round(6/2) = 3..34
    x = antialiased_bilinear(antialiased_bilinear(images, 38, dim=2), 32, dim=3)[:, :, 3:35, :]
    mean, std = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in (image_processor.image_mean, image_processor.image_std))
    expected = (x - mean) / std
    pixels = rewards.clip_pixel_values(images, image_processor)
    # Bound: torch resamples in float32. Each weight comes from a position up to n = 48 pixels, rounded to u·n and
    # divided by the support (≥ 1), so it errs by ≤ 2·n·u (another factor 2 for the renormalisation); a pass sums ≤ 5
    # such products with values in [0, 1] (support 48/38 < 2 input pixels each side), so it errs by ≤ 5·(4n + 1)·u;
    # two passes, then a division by std ≥ min(std).
    u = torch.finfo(torch.float32).eps / 2
    bound = 2 * 5 * (4 * 48 + 1) * u / min(image_processor.image_std)
    assert pixels.shape == expected.shape == (3, 3, 32, 32)
    assert (pixels.double() - expected).abs().max() <= bound
    # ... and it is not the processor's path (8-bit rounding, bicubic), which the bound would not cover
    pil = CLIPProcessor.from_pretrained(tiny_clip)(images=[Image.fromarray(a) for a in rewards.to_uint8(images).permute(0, 2, 3, 1).numpy()], return_tensors="pt")["pixel_values"]  # fmt: skip
    assert (pil.double() - expected).abs().max() > 10 * bound

    reward = rewards.clipscore(model_id=tiny_clip)
    scores = reward(images, prompts, metadata)
    assert_scores(scores, 3)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    text = CLIPProcessor.from_pretrained(tiny_clip)(text=prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")  # fmt: skip
    with torch.no_grad():  # the reference's call: model(pixel_values, texts padded to 77).logits_per_image / 30
        logits = model(pixel_values=expected.float(), **text).logits_per_image.diagonal()
    assert (scores.abs() <= model.logit_scale.exp() / 30 + 1e-6).all()  # |cosine| <= 1
    torch.testing.assert_close(scores, logits / 30, rtol=1e-4, atol=1e-4)  # as the PickScore test: the same inputs


def test_clip_reward_missing_folder_raises_clear_error(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(RuntimeError, match="no_such_model"):
        rewards.pickscore(model_id=missing, processor_id=missing)(*clip_batch())


def test_clip_reward_empty_folder_raises_runtime_error_with_cause(tmp_path):
    reward = rewards.clipscore(model_id=str(tmp_path))  # exists, but holds no model files
    with pytest.raises(RuntimeError, match="hf download") as info:
        reward(*clip_batch())
    assert info.value.__cause__ is not None  # the original error is chained, not lost


# --------------------------------------------------------------------------
# build_reward / weighted sums
# --------------------------------------------------------------------------


def test_registry_lists_all_rewards():
    assert sorted(rewards.REWARDS) == [
        "clipscore",
        "geneval",
        "jpeg_compressibility",
        "jpeg_incompressibility",
        "ocr",
        "pickscore",
    ]


def test_single_name_spec_equals_the_reward():
    smooth, noisy = smooth_and_noisy(64)
    images = torch.cat([smooth, noisy])
    reward = rewards.build_reward("jpeg_compressibility")
    assert torch.equal(reward(images, ["", ""], [{}, {}]), rewards.jpeg_compressibility(images, ["", ""], [{}, {}]))


def test_weighted_sum_equals_hand_computed_sum(tiny_clip):
    spec = "jpeg_incompressibility=0.25, clipscore=-2, pickscore=0.5"
    reward = rewards.build_reward(
        spec, pickscore={"model_id": tiny_clip, "processor_id": tiny_clip}, clipscore={"model_id": tiny_clip}
    )
    images, prompts, metadata = clip_batch()
    parts = reward.components(images, prompts, metadata)
    assert list(parts) == ["jpeg_incompressibility", "clipscore", "pickscore"]
    for part in parts.values():
        assert_scores(part, 3)
    total = reward(images, prompts, metadata)
    assert_scores(total, 3)
    expected = [
        0.25 * parts["jpeg_incompressibility"][i].item()
        - 2 * parts["clipscore"][i].item()
        + 0.5 * parts["pickscore"][i].item()
        for i in range(3)
    ]
    torch.testing.assert_close(total, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reward.combine(parts), total)


def test_parse_spec_weights():
    assert rewards.parse_spec("ocr=0.5,pickscore=0.5") == {"ocr": 0.5, "pickscore": 0.5}
    assert rewards.parse_spec(" ocr , clipscore=0 ") == {"ocr": 1.0, "clipscore": 0.0}


def test_unknown_reward_lists_valid_names():
    with pytest.raises(ValueError, match="unknown reward 'aesthetic'") as info:
        rewards.build_reward("ocr=1,aesthetic=1")
    for name in rewards.REWARDS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty reward spec"),
        ("   ", "empty reward spec"),
        ("ocr=0.5,", "empty entry"),
        ("=0.5", "empty entry"),
        ("ocr=half", "bad weight 'half'"),
        ("ocr=", "bad weight ''"),
        ("ocr=nan", "must be finite"),
        ("ocr=1,ocr=2", "appears twice"),
    ],
)
def test_malformed_spec_raises(spec, message):
    with pytest.raises(ValueError, match=message):
        rewards.build_reward(spec)


def test_bad_overrides_raise():
    with pytest.raises(ValueError, match="unknown reward 'pikscore'"):
        rewards.build_reward("pickscore", pikscore={"model_id": "x"})
    with pytest.raises(ValueError, match="bad override for reward 'pickscore'"):
        rewards.build_reward("pickscore", pickscore={"modelid": "x"})


# --------------------------------------------------------------------------
# prompt sets that feed these rewards
# --------------------------------------------------------------------------

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "prompts")


def read_jsonl(name):
    import json

    with open(os.path.join(PROMPTS_DIR, name)) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_ocr_prompt_set_targets_match_quoted_text():
    rows = read_jsonl("ocr.jsonl")
    assert len(rows) >= 30
    for row in rows:
        # the metadata target and the prompt's quoted text must agree
        assert rewards.ocr_target(row["prompt"], {}) == row["text"] == rewards.ocr_target(row["prompt"], row)


def test_geneval_prompt_set_schema():
    rows = read_jsonl("geneval.jsonl")
    tags = {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert {row["tag"] for row in rows} == tags
    for row in rows:
        assert row["prompt"].startswith("a photo of ")
        for obj in row["include"]:
            assert isinstance(obj["class"], str) and obj["count"] >= 1
            assert obj["class"] in row["prompt"]
        if row["tag"] == "position":
            relation, index = row["include"][1]["position"]
            assert relation in {"left of", "right of", "above", "below"} and index == 0
        if row["tag"] in {"colors", "color_attr"}:
            assert all(obj["color"] in row["prompt"] for obj in row["include"])


def test_general_prompt_set_is_nonempty_lines():
    with open(os.path.join(PROMPTS_DIR, "general.txt")) as f:
        lines = f.read().splitlines()
    assert len(lines) >= 50 and all(line.strip() for line in lines)


def test_reward_model_options_from_the_command_line():
    assert rewards.parse_model_options("") == {}
    assert rewards.parse_model_options("geneval.detector_id=/m/m2f, geneval.clip_model_id=openai/clip,pickscore.model_id=/ps") == {
        "geneval": {"detector_id": "/m/m2f", "clip_model_id": "openai/clip"},
        "pickscore": {"model_id": "/ps"},
    }
    for bad in ("geneval=/m", "geneval.detector_id", ".detector_id=/m", "geneval.=/m", "geneval.detector_id= "):
        with pytest.raises(ValueError, match="reward.option=value"):
            rewards.parse_model_options(bad)
    with pytest.raises(ValueError, match="bad override for reward 'pickscore'"):  # an option the factory lacks
        rewards.build_reward("pickscore", **rewards.parse_model_options("pickscore.detector_id=/m"))
