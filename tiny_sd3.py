"""A complete, randomly initialised Stable Diffusion 3 pipeline small enough for a laptop CPU (~1.5 MB).

`python flow_grpo.py --model tiny-random` trains this with exactly the code that trains SD3.5-Medium: the same
diffusers classes (SD3Transformer2DModel, AutoencoderKL, two CLIPTextModelWithProjection, T5EncoderModel,
FlowMatchEulerDiscreteScheduler with shift 3.0) with every size shrunk. Nothing is downloaded: the tokenizers are
built from an in-memory character vocabulary, the weights from a fixed seed, so two calls give identical models.
It draws noise-like images, but it is a real flow model: Flow-GRPO can still teach it to make smoother ones.
"""

from __future__ import annotations

import string

import torch

# Characters the tiny tokenizers know; anything else maps to the unknown token.
_CHARS = string.ascii_lowercase + string.digits + ".,'\"!?-"
TEXT_DIM = 32  # hidden size of the tiny text encoders (joint attention width)


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    # A byte-pair vocabulary with no merges: every character is a token (c inside a word, c</w> at its end).
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    # A unigram vocabulary of single characters ("▁" marks a word start, as in SentencePiece).
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "▁" + _CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_sd3_pipeline(seed: int = 0, sample_size: int = 32):
    """A StableDiffusion3Pipeline with random weights: 32x32 px images, 4-channel 16x16 latents, 2 layers each."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    with torch.random.fork_rng(devices=[]):  # seed the weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        clip_cfg = CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=TEXT_DIM, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, projection_dim=TEXT_DIM, max_position_embeddings=77,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
        text_encoder, text_encoder_2 = CLIPTextModelWithProjection(clip_cfg), CLIPTextModelWithProjection(clip_cfg)
        t5 = T5EncoderModel(
            T5Config(vocab_size=len(t5_tok), d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, decoder_start_token_id=0)
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=4, sample_size=sample_size, use_quant_conv=False, use_post_quant_conv=False,
            # SD3's VAE latent normalisation constants, so decoding goes through the same arithmetic
            scaling_factor=1.5305, shift_factor=0.0609,
        )
        transformer = SD3Transformer2DModel(
            sample_size=sample_size // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=TEXT_DIM,
            caption_projection_dim=TEXT_DIM, pooled_projection_dim=2 * TEXT_DIM, pos_embed_max_size=32,
        )
    for module in (text_encoder, text_encoder_2, t5, vae, transformer):
        module.eval()  # freshly built modules are in train mode (T5 would apply dropout); from_pretrained gives eval
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=text_encoder, tokenizer=clip_tok, text_encoder_2=text_encoder_2, tokenizer_2=clip_tok,
        text_encoder_3=t5, tokenizer_3=t5_tok,
    )
