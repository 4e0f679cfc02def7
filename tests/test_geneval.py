"""Tests for the GenEval reward in rewards.py.

The rules are pinned by hand-written cases: every expected value below was
worked out by hand from the rules as the docstrings of geneval_correct /
geneval_score state them (the benchmark's evaluate() and the reward server's
evaluate_reward()), not by running the code. The model path runs end to end on
a tiny random Mask2Former and CLIP saved to a temporary folder (no download),
checked against a direct re-computation of mmdetection's post-processing.
"""

import math
import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from tiny_models import save_tiny_clip, save_tiny_mask2former


def det(x1, y1, x2, y2, score=0.95, color=None):
    return rewards.Detection((x1, y1, x2, y2), score, color)


def verdicts(detections, metadata):
    """(benchmark verdict, strict flag, partial-credit score) for one image."""
    strict, score = rewards.geneval_score(detections, metadata)
    return rewards.geneval_correct(detections, metadata), strict, score


DOG = {"class": "dog", "count": 1}
CAT = {"class": "cat", "count": 1}

# --------------------------------------------------------------------------
# relative position
# --------------------------------------------------------------------------

# B is a 20 x 20 box at the origin, so with A also 20 x 20 the dead zone is 0.1 * (20 + 20) = 4 px per axis.
B = (0, 0, 20, 20)


@pytest.mark.parametrize(
    "a, expected",
    [
        # offset (-60, 0): shrunk (-56, 0) / 60 = (-0.93, 0)
        ((-60, 0, -40, 20), {"left of"}),
        ((60, 0, 80, 20), {"right of"}),
        # image y points down: a negative y offset is "above"
        ((0, -60, 20, -40), {"above"}),
        ((0, 60, 20, 80), {"below"}),
        # offset (-3, 0) lies inside the 4 px dead zone: shrunk to (0, 0), no relation at all
        ((-3, 0, 17, 20), set()),
        # offset (-6, 0): shrunk -2 / 6 = -0.33, not past -0.5
        ((-6, 0, 14, 20), set()),
        # offset (-10, 0): shrunk -6 / 10 = -0.6, past -0.5
        ((-10, 0, 10, 20), {"left of"}),
        # diagonal offset (-60, -60): shrunk (-56, -56) / 84.85 = (-0.66, -0.66), both relations
        ((-60, -60, -40, -40), {"left of", "above"}),
        # offset (-40, 20): shrunk (-36, 16) / 44.72 = (-0.80, 0.36): only the horizontal one
        ((-40, 20, -20, 40), {"left of"}),
    ],
)
def test_relative_position_hand_worked(a, expected):
    assert rewards.relative_position(a, B) == expected


def test_relative_position_dead_zone_grows_with_box_sizes():
    # offset (-30, 0); with a 200 px wide A the dead zone is 0.1 * (200 + 20) = 22: shrunk -8 / 30 = -0.27
    assert rewards.relative_position((-120, 0, 80, 20), B) == set()
    # the same offset between two 20 px boxes: dead zone 4, shrunk -26 / 30 = -0.87
    assert rewards.relative_position((-30, 0, -10, 20), B) == {"left of"}


# --------------------------------------------------------------------------
# the rules, one GenEval tag at a time
# --------------------------------------------------------------------------

SINGLE = {"tag": "single_object", "include": [DOG]}


@pytest.mark.parametrize(
    "found, expected",
    [
        ({"dog": [det(0, 0, 9, 9)]}, (True, True, 1.0)),  # credits [1]
        ({}, (False, False, 0.0)),  # credits [1 - 1/1]
        ({"cat": [det(0, 0, 9, 9)]}, (False, False, 0.0)),  # the wrong object
        # two dogs: the benchmark asks for at least one; the server for exactly one, credit 1 - 1/1
        ({"dog": [det(0, 0, 9, 9), det(20, 0, 29, 9)]}, (True, False, 0.0)),
        # three dogs: credit 1 - 2/1 = -1 (the reference does not clip it)
        ({"dog": [det(0, 0, 9, 9)] * 3}, (True, False, -1.0)),
    ],
)
def test_single_object(found, expected):
    assert verdicts(found, SINGLE) == expected


TWO = {"tag": "two_object", "include": [CAT, DOG]}


@pytest.mark.parametrize(
    "found, expected",
    [
        ({"cat": [det(0, 0, 9, 9)], "dog": [det(20, 0, 29, 9)]}, (True, True, 1.0)),  # credits [1, 1]
        ({"cat": [det(0, 0, 9, 9)]}, (False, False, 0.5)),  # credits [1, 0]
        ({"dog": [det(0, 0, 9, 9)]}, (False, False, 0.5)),  # credits [0, 1]
        ({"cat": [det(0, 0, 9, 9)], "dog": [det(20, 0, 29, 9)] * 2}, (True, False, 0.5)),  # credits [1, 0]
    ],
)
def test_two_objects(found, expected):
    assert verdicts(found, TWO) == expected


COUNT = {"tag": "counting", "include": [{"class": "apple", "count": 3}], "exclude": [{"class": "apple", "count": 4}]}


@pytest.mark.parametrize(
    "apples, expected",
    [
        (3, (True, True, 1.0)),  # credit 1 - 0/3
        (2, (False, False, 2 / 3)),  # under: 1 - 1/3
        (4, (False, False, 2 / 3)),  # over: 1 - 1/3; the benchmark fails it through exclude (4 >= 4)
        (0, (False, False, 0.0)),  # 1 - 3/3
        (7, (False, False, -1 / 3)),  # 1 - 4/3
    ],
)
def test_counting_over_and_under(apples, expected):
    found = {"apple": [det(10 * i, 0, 10 * i + 9, 9) for i in range(apples)]} if apples else {}
    correct, strict, score = verdicts(found, COUNT)
    assert (correct, strict) == expected[:2]
    assert score == pytest.approx(expected[2], abs=1e-12)  # 1e-12: one float division


def test_counting_over_count_is_only_caught_by_exclude():
    # the benchmark keeps the 3 most confident apples; without the exclude entry a 4th goes unnoticed
    four = {"apple": [det(10 * i, 0, 10 * i + 9, 9) for i in range(4)]}
    assert rewards.geneval_correct(four, {"tag": "counting", "include": COUNT["include"]})
    assert not rewards.geneval_correct(four, COUNT)


COLOR = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}


@pytest.mark.parametrize(
    "cars, expected",
    [
        ([det(0, 0, 9, 9, color="red")], (True, True, 1.0)),  # credits [1, 1]
        ([det(0, 0, 9, 9, color="blue")], (False, False, 0.5)),  # credits [1, 1 - 1/1]
        ([], (False, False, 0.0)),  # credits [0, 0]: no car, so no colour credit either
        # two cars, the most confident red: the benchmark only looks at it (and the second has no colour,
        # as the scorer names colours only where a rule reads them); the server wants one car: [0, 0]
        ([det(0, 0, 9, 9, 0.9, "red"), det(20, 0, 29, 9, 0.8)], (True, False, 0.0)),
        ([det(0, 0, 9, 9, 0.9, "blue"), det(20, 0, 29, 9, 0.8)], (False, False, 0.0)),
    ],
)
def test_colors(cars, expected):
    found = {"car": cars} if cars else {}
    assert verdicts(found, COLOR) == expected


def test_colors_of_several_objects_give_partial_credit():
    meta = {"tag": "colors", "include": [{"class": "dog", "count": 2, "color": "white"}]}
    found = {"dog": [det(0, 0, 9, 9, 0.9, "white"), det(20, 0, 29, 9, 0.8, "black")]}
    # credits [1 - 0/2, 1 - |2 - 1|/2] = [1, 0.5]
    assert verdicts(found, meta) == (False, False, 0.75)


ATTR = {
    "tag": "color_attr",
    "include": [{"class": "cup", "count": 1, "color": "red"}, {"class": "book", "count": 1, "color": "blue"}],
}


@pytest.mark.parametrize(
    "cup, book, expected",
    [
        ("red", "blue", (True, True, 1.0)),  # credits [1, 1, 1, 1]
        ("blue", "red", (False, False, 0.5)),  # colours swapped between the objects: [1, 0, 1, 0]
        ("red", "red", (False, False, 0.75)),  # [1, 1, 1, 0]
        ("red", None, (False, False, 0.5)),  # no book: [1, 1, 0, 0]
    ],
)
def test_color_attribution(cup, book, expected):
    found = {"cup": [det(0, 0, 9, 9, color=cup)]}
    if book:
        found["book"] = [det(20, 0, 29, 9, color=book)]
    assert verdicts(found, ATTR) == expected


POSITION = {"tag": "position", "include": [CAT, {"class": "dog", "count": 1, "position": ["left of", 0]}]}
CAT_BOX = det(60, 0, 80, 20)


@pytest.mark.parametrize(
    "found, expected",
    [
        # dog centre 60 px left of the cat's: credits [1, 1, 1]
        ({"cat": [CAT_BOX], "dog": [det(0, 0, 20, 20)]}, (True, True, 1.0)),
        # dog right of the cat: [1, 1, 0, 1] -- the reference appends the 1 after the 0
        ({"cat": [CAT_BOX], "dog": [det(120, 0, 140, 20)]}, (False, False, 0.75)),
        # dog 2 px left of the cat, inside the 4 px dead zone: no relation, same credits
        ({"cat": [CAT_BOX], "dog": [det(58, 0, 78, 20)]}, (False, False, 0.75)),
        # dog above the cat, not left of it
        ({"cat": [CAT_BOX], "dog": [det(60, -60, 80, -40)]}, (False, False, 0.75)),
        # no cat: the dog has no target: [0, 1, 0]
        ({"dog": [det(0, 0, 20, 20)]}, (False, False, 1 / 3)),
        # no dog: [1, 0, 0]
        ({"cat": [CAT_BOX]}, (False, False, 1 / 3)),
        # two dogs, the more confident one left: the benchmark checks only it; the server wants one dog:
        # [1, 1 - 1/1, 0]
        ({"cat": [CAT_BOX], "dog": [det(0, 0, 20, 20, 0.9), det(120, 0, 140, 20, 0.8)]}, (True, False, 1 / 3)),
    ],
)
def test_position(found, expected):
    correct, strict, score = verdicts(found, POSITION)
    assert (correct, strict) == expected[:2]
    assert score == pytest.approx(expected[2], abs=1e-12)  # 1e-12: one float division


def test_position_must_hold_against_every_target_object():
    meta = {"tag": "position", "include": [{"class": "cat", "count": 2}, POSITION["include"][1]]}
    dog = det(100, 0, 120, 20)
    # the dog is right of the first cat but left of the second
    found = {"cat": [det(0, 0, 20, 20), det(200, 0, 220, 20)], "dog": [dog]}
    assert verdicts(found, meta) == (False, False, 0.75)  # [1, 1, 0, 1]
    found = {"cat": [det(200, 0, 220, 20), det(300, 0, 320, 20)], "dog": [dog]}
    assert verdicts(found, meta) == (True, True, 1.0)  # [1, 1, 1]


def test_excluded_objects():
    # "a dog and no cat": only the benchmark reads exclude; the server's strict flag and score ignore it
    meta = {"tag": "single_object", "include": [DOG], "exclude": [{"class": "cat", "count": 1}]}
    assert verdicts({"dog": [det(0, 0, 9, 9)]}, meta) == (True, True, 1.0)
    assert verdicts({"dog": [det(0, 0, 9, 9)], "cat": [det(20, 0, 29, 9)]}, meta) == (False, True, 1.0)
    # exclude counts: {"cat", 2} forbids two cats, allows one
    meta["exclude"] = [{"class": "cat", "count": 2}]
    assert verdicts({"dog": [det(0, 0, 9, 9)], "cat": [det(20, 0, 29, 9)]}, meta)[0]


def test_a_needed_colour_that_was_not_named_is_an_error():
    with pytest.raises(ValueError, match="no colour"):
        rewards.geneval_score({"car": [det(0, 0, 9, 9)]}, COLOR)


def test_colors_needed_are_the_first_count_of_each_found_colour_class():
    assert rewards.geneval_colors_needed({"cup": [det(0, 0, 1, 1)] * 3, "book": []}, ATTR) == {"cup": 1}
    meta = {"tag": "colors", "include": [{"class": "dog", "count": 2, "color": "white"}]}
    assert rewards.geneval_colors_needed({"dog": [det(0, 0, 1, 1)]}, meta) == {}  # too few to check
    assert rewards.geneval_colors_needed({"dog": [det(0, 0, 1, 1)] * 5}, meta) == {"dog": 2}
    assert rewards.geneval_colors_needed({"dog": [det(0, 0, 1, 1)]}, SINGLE) == {}  # no colour asked


# --------------------------------------------------------------------------
# detection filtering, boxes, crops, preprocessing
# --------------------------------------------------------------------------


def test_select_detections_thresholds_sorts_and_groups():
    dog, cat = rewards.GENEVAL_CLASSES.index("dog"), rewards.GENEVAL_CLASSES.index("cat")
    labels = [dog, cat, dog, dog, cat]
    scores = [0.5, 0.95, 0.3, 0.92, 0.31]
    # 0.3 itself is not "above 0.3"; most confident first
    assert rewards.select_detections(labels, scores, 0.3) == {"dog": [3, 0], "cat": [1, 4]}
    # the counting threshold
    assert rewards.select_detections(labels, scores, 0.9) == {"dog": [3], "cat": [1]}
    assert rewards.select_detections(labels, scores, 0.99) == {}


def test_select_detections_keeps_the_16_most_confident():
    scores = [0.5 + i / 100 for i in range(20)]  # index 19 is the most confident
    kept = rewards.select_detections([0] * 20, scores, 0.3)
    assert kept == {"person": list(range(19, 3, -1))}


def test_mask_boxes_are_tight_and_exclusive():
    masks = torch.zeros(3, 5, 7, dtype=torch.bool)
    masks[0, 1:3, 2:6] = True  # rows 1-2, columns 2-5
    masks[1, 4, 0] = True  # one pixel, bottom left
    expected = torch.tensor([[2.0, 1.0, 6.0, 3.0], [0.0, 4.0, 1.0, 5.0], [0.0, 0.0, 0.0, 0.0]])  # mask 2 is empty
    assert torch.equal(rewards.mask_boxes(masks), expected)


def test_masked_crop_matches_pil_composite_over_grey():
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 6, 8), dtype=torch.uint8, generator=generator)
    mask = torch.zeros(6, 8, dtype=torch.bool)
    mask[1:4, 2:5] = True
    mask[2, 6] = True
    box = (2.0, 1.0, 7.0, 4.0)
    # GenEval's own recipe: PIL composite with the mask as a mode "1" image, then PIL's crop
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    blank = Image.new("RGB", pil.size, color="#999")
    expected = Image.composite(pil, blank, Image.fromarray(mask.numpy())).crop(box)
    crop = rewards.masked_crop(image, mask, box)
    assert crop.size == (5, 3)
    assert np.array_equal(np.array(crop), np.array(expected))


def test_detector_input_resizes_like_mmdetection():
    # a 512 x 512 image (the paper's resolution): factor min(1333/512, 800/512) = 1.5625 -> 800 x 800, no padding
    x, resized = rewards.detector_input(torch.full((1, 3, 512, 512), 153, dtype=torch.uint8))
    assert x.shape == (1, 3, 800, 800) and resized == (800, 800)
    # a constant image stays constant: (153 - mean) / std per channel
    expected = [(153 - 123.675) / 58.395, (153 - 116.28) / 57.12, (153 - 103.53) / 57.375]
    # 1e-6: float32 rounding of one subtraction and one division of numbers below 200
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor(expected), rtol=0, atol=1e-6)
    # 6 x 8: factor min(1333/8, 800/6) = 133.33 -> 800 x int(1066.67 + 0.5) = 1067, padded to 1088
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 6, 8), dtype=torch.uint8, generator=generator)
    x, (h, w) = rewards.detector_input(image)
    assert x.shape == (1, 3, 800, 1088) and (h, w) == (800, 1067)
    assert (x[..., w:] == 0).all()  # mmdetection pads after normalising, with zeros
    # the resize is bilinear with half-pixel centres (OpenCV's, which mmdetection uses); PIL's bilinear
    # upscaling computes the same in fixed point, so after rounding to 8 bits they differ by at most 1 level
    mean, std = torch.tensor(rewards.DETECTOR_MEAN).view(3, 1, 1), torch.tensor(rewards.DETECTOR_STD).view(3, 1, 1)
    pixels = x[0, :, :h, :w] * std + mean
    pil = Image.fromarray(image[0].permute(1, 2, 0).numpy()).resize((w, h), Image.BILINEAR)
    reference = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()
    assert (pixels - reference).abs().max() <= 1 + 1e-3  # 1e-3: float32 round trip of (x - mean) / std


# --------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"include": [DOG]}, "'tag' must be one of"),
        ({"tag": "colours", "include": [DOG]}, "'tag' must be one of"),
        ({"tag": "single_object", "include": []}, "non-empty list"),
        # COCO's "mouse" is "computer mouse" in GenEval
        ({"tag": "single_object", "include": [{"class": "mouse", "count": 1}]}, "80 COCO classes"),
        ({"tag": "counting", "include": [{"class": "dog", "count": 0}]}, "'count' must be an integer"),
        ({"tag": "counting", "include": [{"class": "dog", "count": 17}]}, "'count' must be an integer"),
        ({"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "grey"}]}, "'color' must be one of"),
        ({"tag": "position", "include": [{**DOG, "position": ["left of", 0]}]}, "earlier include entry"),
        ({"tag": "position", "include": [CAT, {**DOG, "position": ["near", 0]}]}, "'position' must be"),
        ({"tag": "counting", "include": [DOG], "exclude": [{"class": "dog"}]}, r"exclude\[0\] 'count'"),
        ("dog", "expected a dict"),
    ],
)
def test_bad_metadata_raises_naming_the_prompt(metadata, message):
    with pytest.raises(ValueError, match=message) as info:
        rewards.check_geneval_metadata("a photo of a dog", metadata)
    assert "a photo of a dog" in str(info.value)


def test_shipped_prompts_are_valid_geneval_metadata():
    import json
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "prompts", "geneval.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:
        rewards.check_geneval_metadata(row["prompt"], row)
        if row["tag"] == "counting":  # GenEval's format: a counting prompt forbids one object more
            (req,) = row["include"]
            assert row["exclude"] == [{"class": req["class"], "count": req["count"] + 1}]
        else:
            assert "exclude" not in row


# --------------------------------------------------------------------------
# end to end: tiny random Mask2Former + CLIP through the real code path
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    return save_tiny_mask2former(tmp_path_factory.mktemp("tiny_mask2former")), save_tiny_clip(
        tmp_path_factory.mktemp("tiny_clip")
    )


def block_images():
    """Two 24 x 32 grey images with coloured blocks: shapes the tiny detector's masks follow."""
    images = torch.full((2, 3, 24, 32), 0.5)
    images[0, :, 4:12, 2:10] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    images[0, :, 14:22, 20:30] = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)
    images[1, :, 2:20, 12:28] = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1)
    return images


# image 0 twice, with the counting threshold (0.9) and the usual one (0.3); image 1 twice
E2E_IMAGES = block_images()[[0, 0, 1, 1]]
E2E_METADATA = [
    {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]},
    {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}]},
    {"tag": "color_attr", "include": [{"class": "cat", "count": 2, "color": "green"}, {**DOG, "color": "blue"}]},
    {"tag": "position", "include": [DOG, {"class": "cat", "count": 1, "position": ["right of", 0]}]},
]
E2E_PROMPTS = ["two cats", "a red cat", "two green cats and a blue dog", "a cat right of a dog"]


def reference_detections(folder, image, threshold):
    """mmdetection's instance post-processing and GenEval's filter, written out directly for one image:
    every (query, class) pair of the top 100, every query's mask upsampled, boxes from numpy."""
    model = rewards._mask2former_class().from_pretrained(folder).eval()
    inputs, (h, w) = rewards.detector_input(image[None])
    with torch.no_grad():
        out = model(pixel_values=inputs)
    probs = out.class_queries_logits[0].softmax(-1)[:, :-1]  # (Q, 80)
    resize = dict(mode="bilinear", align_corners=False)
    logits = torch.nn.functional.interpolate(out.masks_queries_logits, size=inputs.shape[-2:], **resize)
    logits = torch.nn.functional.interpolate(logits[:, :, :h, :w], size=image.shape[-2:], **resize)[0]
    top_p, top_index = probs.flatten().topk(min(100, probs.numel()))
    found = {}
    for p, index in zip(top_p.tolist(), top_index.tolist()):
        query, label = divmod(index, probs.shape[1])
        mask = (logits[query] > 0).numpy()
        score = p * logits[query].sigmoid().numpy()[mask].sum() / (mask.sum() + 1e-6)
        if score > threshold:
            ys, xs = np.nonzero(mask)
            box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            found.setdefault(rewards.GENEVAL_CLASSES[label], []).append((float(score), box, mask))
    return {name: sorted(objects, key=lambda o: -o[0])[:16] for name, objects in found.items()}


def reference_color(clip_folder, image, mask, box, name):
    """The colour GenEval's zero-shot classifier picks, through CLIPModel's own forward pass."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_folder).eval(), CLIPProcessor.from_pretrained(clip_folder)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    crop = Image.composite(pil, Image.new("RGB", pil.size, "#999"), Image.fromarray(mask)).crop(box)
    texts = [t.format(color=c, object=name) for c in rewards.GENEVAL_COLORS for t in rewards.GENEVAL_COLOR_TEMPLATES]
    with torch.no_grad():
        out = model(**processor(text=texts, images=crop, padding=True, return_tensors="pt"))
    per_color = out.text_embeds.view(len(rewards.GENEVAL_COLORS), -1, out.text_embeds.shape[-1]).mean(1)
    logits = torch.nn.functional.normalize(per_color, dim=-1) @ out.image_embeds[0]
    return rewards.GENEVAL_COLORS[int(logits.argmax())]


@pytest.fixture(scope="module")
def e2e(tiny_folders):
    """Run the scorer once, recording what the rules received."""
    detector, clip = tiny_folders
    reward = rewards.build_reward("geneval", geneval={"detector_id": detector, "clip_model_id": clip})
    received = []
    original = rewards.geneval_score
    rewards.geneval_score = lambda found, meta: received.append(found) or original(found, meta)
    try:
        parts = reward.components(E2E_IMAGES, E2E_PROMPTS, E2E_METADATA)
    finally:
        rewards.geneval_score = original
    return reward, parts, received


def test_e2e_rules_receive_what_the_detector_produced(tiny_folders, e2e):
    detector, clip = tiny_folders
    _, _, received = e2e
    assert len(received) == 4
    pixels = rewards.to_uint8(E2E_IMAGES)
    for i, (found, meta) in enumerate(zip(received, E2E_METADATA)):
        threshold = 0.9 if meta["tag"] == "counting" else 0.3
        expected = reference_detections(detector, pixels[i], threshold)
        assert sorted(found) == sorted(expected)
        needed = rewards.geneval_colors_needed(found, meta)
        for name, objects in expected.items():
            assert len(found[name]) == len(objects)
            for rank, (d, (score, box, mask)) in enumerate(zip(found[name], objects)):
                assert d.box == tuple(float(v) for v in box)
                # 1e-5: float32 sums of up to 768 sigmoids, in a different order
                assert d.score == pytest.approx(score, abs=1e-5)
                if rank < needed.get(name, 0):
                    assert d.color == reference_color(clip, pixels[i], mask, box, name)
                else:
                    assert d.color is None  # CLIP only runs where a rule reads the colour
    # what this batch covers (the tiny model's confidences lie in 0.6..0.85, see tiny_models.py):
    assert received[0] == {} and received[1]  # the same image: nothing passes 0.9, something passes 0.3
    assert any(d.color for found in received for objects in found.values() for d in objects)
    boxes = {d.box for found in received for objects in found.values() for d in objects}
    assert any(box != (0.0, 0.0, 32.0, 24.0) for box in boxes)  # not every mask fills the image


def test_e2e_scores_and_diagnostics(e2e):
    reward, parts, received = e2e
    keys = {"geneval", "geneval/strict", "geneval/correct"}
    keys |= {f"geneval/{k}/{tag}" for k in ("strict", "correct") for tag in rewards.GENEVAL_TAGS}
    assert set(parts) == keys
    for value in parts.values():
        assert value.shape == (4,) and value.dtype == torch.float32 and value.device.type == "cpu"
    for i, (found, meta) in enumerate(zip(received, E2E_METADATA)):
        strict, score = rewards.geneval_score(found, meta)
        assert parts["geneval"][i].item() == pytest.approx(score, abs=1e-6)  # 1e-6: float32 storage
        assert parts["geneval/strict"][i].item() == float(strict)
        assert parts["geneval/correct"][i].item() == float(rewards.geneval_correct(found, meta))
        for key in ("strict", "correct"):
            for tag in rewards.GENEVAL_TAGS:
                value = parts[f"geneval/{key}/{tag}"][i].item()
                assert value == parts[f"geneval/{key}"][i].item() if tag == meta["tag"] else math.isnan(value)
    # training uses the score alone
    assert torch.equal(reward.combine(parts), parts["geneval"])


def test_e2e_is_deterministic(tiny_folders, e2e):
    reward, parts, _ = e2e
    assert torch.equal(reward(E2E_IMAGES, E2E_PROMPTS, E2E_METADATA), parts["geneval"])  # the loaded models again
    detector, clip = tiny_folders
    fresh = rewards.geneval(detector_id=detector, clip_model_id=clip)
    scores, extra = fresh.details(E2E_IMAGES, E2E_PROMPTS, E2E_METADATA)
    assert torch.equal(scores, parts["geneval"])
    assert torch.equal(extra["correct"], parts["geneval/correct"])


def test_bad_metadata_fails_before_loading_models():
    reward = rewards.geneval(detector_id="./no_such_detector")
    with pytest.raises(ValueError, match="'tag' must be one of"):
        reward(E2E_IMAGES[:1], ["a dog"], [{"include": [DOG]}])
    assert reward.detector is None


# --------------------------------------------------------------------------
# loading errors
# --------------------------------------------------------------------------


def test_missing_detector_folder_raises_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="no_such_detector"):
        rewards.geneval(detector_id=str(tmp_path / "no_such_detector"))(E2E_IMAGES[:1], ["a dog"], [SINGLE])


def test_offline_missing_weights_fail_without_retrying(monkeypatch):
    # huggingface_hub retries a failed download with sleeps of 1, 2, 4, 8, 8 s per file, which adds up to
    # minutes. Here every connection fails at once and every sleep is recorded instead of slept.
    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    sleeps = []
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(time, "sleep", sleeps.append)
    # set after huggingface_hub was imported (by the tests above), which reads it only at import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reward = rewards.geneval(detector_id="geneval-tests/no-such-detector")
    with pytest.raises(RuntimeError, match="hf download geneval-tests/no-such-detector") as info:
        reward(E2E_IMAGES[:1], ["a dog"], [SINGLE])
    assert info.value.__cause__ is not None
    assert sleeps == []  # no retry


def test_detector_with_other_classes_is_refused(tmp_path):
    folder = save_tiny_mask2former(tmp_path, num_labels=3, classes=(0, 1))
    with pytest.raises(RuntimeError, match="has 3 classes"):
        rewards.geneval(detector_id=folder, clip_model_id=folder)(E2E_IMAGES[:1], ["a dog"], [SINGLE])


# --------------------------------------------------------------------------
# the WeightedReward contract for rewards with diagnostics
# --------------------------------------------------------------------------


class WithDetails:
    """A reward with a details() method; calling it directly is an error, so components() must use details()."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images, prompts, metadata):
        raise AssertionError("components() must call details(), not the reward")

    def details(self, images, prompts, metadata):
        self.calls += 1
        extra = {"strict": torch.tensor([1.0, 0.0]), "strict/counting": torch.tensor([math.nan, 0.0])}
        return torch.tensor([1.0, 2.0]), extra


def test_components_add_diagnostics_and_combine_ignores_them():
    with_details = WithDetails()
    reward = rewards.WeightedReward(
        {"toy": with_details, "jpeg_compressibility": rewards.jpeg_compressibility},
        {"toy": 2.0, "jpeg_compressibility": 0.5},
    )
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    parts = reward.components(images, ["", ""], [{}, {}])
    assert with_details.calls == 1
    assert list(parts) == ["toy", "toy/strict", "toy/strict/counting", "jpeg_compressibility"]
    assert torch.equal(parts["toy/strict"], torch.tensor([1.0, 0.0]))
    assert math.isnan(parts["toy/strict/counting"][0]) and parts["toy/strict/counting"][1] == 0
    jpeg = rewards.jpeg_compressibility(images, ["", ""], [{}, {}])
    expected = torch.tensor([2.0 * 1.0 + 0.5 * jpeg[0].item(), 2.0 * 2.0 + 0.5 * jpeg[1].item()])
    torch.testing.assert_close(reward.combine(parts), expected, rtol=1e-6, atol=1e-6)  # float32 sums


def test_geneval_trains_the_tiny_sd3_end_to_end_and_logs_per_tag_accuracy(tmp_path, tiny_folders):
    # `--reward geneval` through flow_grpo.train: the tiny random SD3 pipeline samples, the tiny scorer models score
    # (the real loading and scoring code), GRPO trains; the per-tag diagnostics reach the metrics. The prompts ask
    # for the tiny detector's two classes (cat, dog). Its random weights score every image of a prompt alike (the
    # rewards differ between prompts, not within a group: advantage 0 everywhere), so the JPEG reward is added (on
    # its scale, kB/500, it barely moves the sum) to give GRPO differences within groups to learn from.
    import json

    import flow_grpo as fg

    detector, clip = tiny_folders
    prompt_file = tmp_path / "cats_and_dogs.jsonl"
    rows = [
        {"prompt": "a photo of a cat", "tag": "single_object", "include": [{"class": "cat", "count": 1}]},
        {"prompt": "a photo of a cat and a dog", "tag": "two_object", "include": [{"class": "cat", "count": 1}, DOG]},
        {"prompt": "a photo of two dogs", "tag": "counting", "include": [{"class": "dog", "count": 2}],
         "exclude": [{"class": "dog", "count": 3}]},
        {"prompt": "a photo of a red cat", "tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}]},
    ]  # fmt: skip
    prompt_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = fg.parse_config(["--model", "tiny-random", "--reward", "geneval=1,jpeg_compressibility=1", "--prompts",
                           str(prompt_file), "--out", str(tmp_path / "run"), "--epochs", "1", "--group_size", "4", "--groups_per_epoch", "4",
                           "--batch_size", "8", "--optimizer_steps_per_epoch", "2", "--eval_every", "1", "--save_every", "0"])  # fmt: skip
    # the detector at 128 px instead of GenEval's 1333 x 800: the 32 px images gain nothing from more, the test time does
    reward = rewards.build_reward(cfg.reward, geneval={"detector_id": detector, "clip_model_id": clip, "scale": (128, 128)})
    model = fg.SD3Model(fg.load_pipeline(cfg.model, torch.float32), cfg, torch.device("cpu"), torch.float32)
    (m,) = fg.train(cfg, model, reward, fg.load_prompts(cfg.prompts), log=lambda line: None)
    assert m["reward/std"] > 0 and m["policy/zero_adv_frac"] < 1  # something to learn from
    assert m["step"] == 2 and math.isfinite(m["policy/grad_norm"]) and m["policy/grad_norm"] > 0  # and it trained
    # the benchmark verdict and the strict flag over the epoch's samples and on evaluation, with per-tag entries
    # (a tag without samples is NaN in memory, null in metrics.jsonl)
    for prefix in ("reward/", "eval/"):
        for key in ("geneval/strict", "geneval/correct"):
            assert 0.0 <= m[prefix + key] <= 1.0
        for tag in ("single_object", "two_object", "counting", "colors"):
            assert 0.0 <= m[f"{prefix}geneval/strict/{tag}"] <= 1.0
        assert m[f"{prefix}geneval/strict/position"] != m[f"{prefix}geneval/strict/position"]  # no such prompt: NaN
