"""Tiny stand-ins for the edge, cloud and CLIP models, for the tests and the demo.

They follow diffusers' ``get_dummy_components`` (tests/pipelines): the same classes as the
real ones, built from small configs with fixed seeds and saved as safetensors, so the whole
system runs offline on a CPU in seconds and loads them through ``workers.services.pipelines``
exactly
as it loads real weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

# From their modules rather than the package root, whose lazy namespace type checkers resolve
# to diffusers' placeholder classes.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    StableDiffusion3Pipeline,
)
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from routing.metrics import METRICS

TIERS: tuple[str, ...] = ("edge", "cloud", "clip")


_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


_MAX_TOKENS = 77  # CLIP's context length; diffusers pads every prompt to it.


# Whole-word merges for these, so the metric texts and everyday prompts tokenize as words;
# anything else still tokenizes, byte by byte.
_COMMON_WORDS: tuple[str, ...] = ("a", "an", "the", "of", "in", "on", "and", "at", "cat", "dog")


def make_tiny(dest: Path, *, seed: int = 0) -> dict[str, Path]:
    """Build and save tiny edge, cloud and CLIP models under ``dest``; return their folders.

    Offline and deterministic for a seed. The cloud model differs from the edge one in every
    part (transformer instead of UNet, 16 latent channels, two text encoders, flow matching),
    as SD3 differs from SD2.1, and is the larger of the two, so their images and their costs
    differ the way the real tiers' do.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_tokenizer()
    paths = {tier: dest / tier for tier in TIERS}
    _tiny_edge(tokenizer, seed).save_pretrained(paths["edge"], safe_serialization=True)
    _tiny_cloud(tokenizer, seed).save_pretrained(paths["cloud"], safe_serialization=True)
    model, processor = _tiny_clip(tokenizer, seed)
    model.save_pretrained(paths["clip"], safe_serialization=True)
    processor.save_pretrained(paths["clip"])
    return paths


def _tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer built in memory, so no vocabulary is downloaded.

    The vocabulary is laid out as CLIP's is: the 256 byte symbols, the same with the
    end-of-word marker ``</w>``, the merge results, then the two special tokens. Merges
    spell out every word of the metric texts and a few common words.
    """
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    vocab.update({f"{symbol}</w>": len(alphabet) + i for i, symbol in enumerate(alphabet)})
    merges = _word_merges(_merge_words())
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab[_BOS] = len(vocab)
    vocab[_EOS] = len(vocab)
    # The tokenizers library wants merges as pairs; transformers annotates them as strings.
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]
        model_max_length=_MAX_TOKENS,
    )


def _merge_words() -> list[str]:
    """The words that get whole-word tokens, in a fixed order (merge ranks follow it)."""
    texts = [text for m in METRICS for text in (m.positive, m.negative)]
    words = {word.strip(".,").lower() for text in texts for word in text.split()}
    return sorted(words | set(_COMMON_WORDS))


def _word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Left-to-right merges that build each word, ending in its ``</w>`` form."""
    merges: dict[tuple[str, str], None] = {}
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        prefix = symbols[0]
        for symbol in symbols[1:]:
            merges[(prefix, symbol)] = None
            prefix += symbol
    return list(merges)


def _text_config(
    tokenizer: CLIPTokenizer,
    *,
    hidden_size: int = 32,
    intermediate_size: int = 37,
    num_hidden_layers: int = 2,
    projection_dim: int = 32,
) -> CLIPTextConfig:
    """A CLIP text config whose special-token ids match ``tokenizer``.

    With ``eos_token_id`` right, CLIP pools at the first end-of-text token, as the real
    models do, rather than at the largest token id (its legacy rule for ``eos_token_id=2``).
    """
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=_MAX_TOKENS,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=4,
        num_hidden_layers=num_hidden_layers,
        projection_dim=projection_dim,
    )


def _tiny_vae(latent_channels: int, **extra: Any) -> AutoencoderKL:
    """The two-block VAE both tiny pipelines use; SD3's has 16 latent channels."""
    return AutoencoderKL(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        **extra,
    )


def _tiny_edge(tokenizer: CLIPTokenizer, seed: int) -> StableDiffusionPipeline:
    """SD2.1-shaped: cross-attention UNet with linear projections, 4-channel VAE, one CLIP
    text encoder, and SD2.1's DDIM scheduler with v-prediction."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(latent_channels=4)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    # A dict, as in diffusers' get_dummy_components: the constructors' annotations do not
    # admit the None components both pipelines accept.
    components: dict[str, Any] = {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    return StableDiffusionPipeline(**components)


def _tiny_cloud(tokenizer: CLIPTokenizer, seed: int) -> StableDiffusion3Pipeline:
    """SD3-shaped: MMDiT transformer over 2x2 patches, 16-channel VAE without quant convs,
    two projected CLIP text encoders, no T5, flow-matching Euler with SD3's shift."""
    encoders = []
    for index, layers in enumerate((2, 3)):
        torch.manual_seed(seed + 10 + index)
        encoders.append(
            CLIPTextModelWithProjection(
                _text_config(tokenizer, intermediate_size=64, num_hidden_layers=layers)
            )
        )
    torch.manual_seed(seed + 12)
    # joint_attention_dim: both encoders' hidden states side by side; pooled: both projections.
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=128,
        pooled_projection_dim=64,
    )
    torch.manual_seed(seed + 13)
    vae = _tiny_vae(
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5305,
    )
    components: dict[str, Any] = {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": vae,
        "text_encoder": encoders[0],
        "tokenizer": tokenizer,
        "text_encoder_2": encoders[1],
        "tokenizer_2": tokenizer,
        "text_encoder_3": None,
        "tokenizer_3": None,
    }
    return StableDiffusion3Pipeline(**components)


def _tiny_clip(tokenizer: CLIPTokenizer, seed: int) -> tuple[CLIPModel, CLIPProcessor]:
    """ViT-shaped CLIP on 32x32 crops, with the PIL image processor so that torchvision is
    not needed."""
    torch.manual_seed(seed + 20)
    text = _text_config(tokenizer)
    config = CLIPConfig(
        text_config=text.to_dict(),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=32,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return CLIPModel(config), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
