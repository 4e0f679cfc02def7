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


# --- SD3.5-Medium's real architecture, randomly initialised: for measuring speed and memory without weights ---
# The transformer and VAE have the published SD3.5-Medium configuration (24 MMDiT blocks, dual attention in
# blocks 0-12, QK RMS-norm, 16-channel latents). The text encoders keep their real output widths (CLIP-L 768,
# CLIP-G 1280, T5-XXL 4096) but `text_layers` layers instead of 12/32/24: they run once per prompt, not per
# denoising step, and their full-size memory is counted separately (text_encoder_parameter_counts).

SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
)
SD3_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280)
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")


def text_encoder_parameter_counts() -> dict[str, int]:
    """Parameters of the full-size SD3 text encoders, counted on the meta device (no memory, no weights)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        models = {
            "clip_l": CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **CLIP_L)),
            "clip_g": CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **CLIP_G)),
            "t5_xxl": T5EncoderModel(T5Config(vocab_size=32128, **T5_XXL)),
        }
    return {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}


def random_sd35_medium_pipeline(text_layers: int = 1, seed: int = 0):
    """A StableDiffusion3Pipeline with SD3.5-Medium's transformer and VAE, random weights (see above)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)

        def clip(spec):
            cfg = dict(spec, num_hidden_layers=text_layers)
            return CLIPTextModelWithProjection(
                CLIPTextConfig(vocab_size=len(clip_tok), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, **cfg)
            )

        modules = dict(
            text_encoder=clip(CLIP_L), text_encoder_2=clip(CLIP_G),
            text_encoder_3=T5EncoderModel(T5Config(vocab_size=len(t5_tok), **dict(T5_XXL, num_layers=text_layers))),
            vae=AutoencoderKL(**SD3_VAE), transformer=SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER),
        )
    for module in modules.values():
        module.eval()
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), tokenizer=clip_tok, tokenizer_2=clip_tok,
        tokenizer_3=t5_tok, **modules,
    )
