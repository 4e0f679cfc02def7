"""Tiny randomly initialised models, built in code and saved with save_pretrained, for the reward tests.

No download: every model here is a few hundred kB of random weights with the real architecture, so the
rewards load them through their real code path (from_pretrained on a folder).
"""

import string

import torch


def save_tiny_clip(folder) -> str:
    """A tiny random CLIPModel, tokenizer and image processor in ``folder``; returns the folder as a string."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    try:  # transformers 5 without torchvision: the PIL-backed processor
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as ImageProcessor

    # Character-level vocabulary: with no merges, BPE splits every word into
    # characters, and the last character of a word carries the "</w>" marker.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])

    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, **layers
        ),
        vision_config=dict(image_size=32, patch_size=8, **layers),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    image_processor = ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def save_tiny_mask2former(folder, classes=("dog", "cat"), seed=0, num_labels=None) -> str:
    """A tiny random Mask2Former for COCO's 80 classes (Swin backbone) in ``folder``; returns the folder.

    ``num_labels`` (default: GenEval's 80) makes a detector for other classes; ``classes`` are then indices.

    Random weights would give every class a probability near 1/81, so nothing would pass GenEval's
    0.3 threshold. Its class head is set so that each query is confidently one of ``classes``:
    logits = 20 · (u·h) for the first class, −20 · (u·h) for the second, −20 for every other class
    and "no object", with u a random direction and h the query's decoder state (layer-normed, so
    |u·h| is of order 1 and the winning class gets probability near 1).
    """
    import rewards
    from transformers import Mask2FormerConfig, SwinConfig

    swin = SwinConfig(
        image_size=224,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=7,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=swin,
        # Why 32: the pixel decoder's GroupNorm uses 32 groups.
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=32,
        num_queries=6,
        num_labels=num_labels or len(rewards.GENEVAL_CLASSES),
    )
    if num_labels is None:
        config.id2label = dict(enumerate(rewards.GENEVAL_CLASSES))
        config.label2id = {name: i for i, name in enumerate(rewards.GENEVAL_CLASSES)}
    torch.manual_seed(seed)
    model = rewards._mask2former_class()(config)
    first, second = (rewards.GENEVAL_CLASSES.index(c) if isinstance(c, str) else c for c in classes)
    direction = torch.nn.functional.normalize(torch.randn(config.hidden_dim), dim=0)
    with torch.no_grad():
        head = model.class_predictor
        head.weight.zero_()
        head.bias.fill_(-20.0)
        head.weight[first], head.bias[first] = 20 * direction, 0.0
        head.weight[second], head.bias[second] = -20 * direction, 0.0
        # Why x30: random mask logits are ~0.06 in size, so every mask score (the mean sigmoid inside the
        # mask) would sit near 0.5; x30 spreads them to ~0.65..0.8, clear of the 0.3 and 0.9 thresholds.
        projection = model.model.pixel_level_module.decoder.mask_projection
        projection.weight.mul_(30)
        projection.bias.mul_(30)
    model.save_pretrained(folder)
    return str(folder)
