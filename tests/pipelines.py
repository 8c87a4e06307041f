"""Tiny random-weight diffusers pipelines built offline (docs/diffusers.md §Pipelines): real classes, CPU, seconds.

Tokenizers are built in memory; every module is created after `torch.manual_seed(0)`, so a builder always returns
the same weights. `call_kwargs(name)` gives arguments that work for each pipeline.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

PROMPT = "A painting of a squirrel eating a burger"
FLUX_DEV = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096)
FLUX_SCHNELL = {**FLUX_DEV, "shift": 1.0, "use_dynamic_shifting": False}


def _seeded(make):
    torch.manual_seed(0)
    return make()


def byte_symbols() -> list[str]:
    """The GPT-2 byte-to-unicode table: printable Latin-1 bytes as themselves, the other 68 as chr(256 + n)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [table[b] for b in range(256)]


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|pad|>": 1, "<|endoftext|>": 2}
    for c in byte_symbols():
        for piece in (c, c + "</w>"):
            vocab[piece] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=77)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for code in range(33, 127):
        pieces += [(chr(code), -3.0), ("▁" + chr(code), -3.5)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    vocab = {c: i for i, c in enumerate(byte_symbols())}
    for s in specials:
        vocab[s] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=1024, additional_special_tokens=specials[1:])


def clip_text(with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=1000, hidden_size=32,
                         intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, layer_norm_eps=1e-5,
                         hidden_act="gelu", projection_dim=32)
    return _seeded(lambda: (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval())


def t5_encoder():
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=5, num_decoder_layers=5, num_heads=4,
                   relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=0, is_encoder_decoder=True)
    return _seeded(lambda: T5EncoderModel(cfg).eval())


def flux_vae(latent_channels: int = 1):
    from diffusers import AutoencoderKL

    return _seeded(lambda: AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1,
                                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                                         scaling_factor=1.5035))


def flux_transformer(in_channels: int = 4, out_channels: int | None = None):
    from diffusers import FluxTransformer2DModel

    return _seeded(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, out_channels=out_channels, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8], guidance_embeds=False))


def flux_scheduler(config: dict = FLUX_DEV):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config)


def flux_components(in_channels: int = 4, out_channels: int | None = None, config: dict = FLUX_DEV,
                    encoders: bool = True) -> dict:
    parts = dict(scheduler=flux_scheduler(config), vae=flux_vae(), text_encoder=clip_text(), tokenizer=clip_tokenizer(),
                 text_encoder_2=t5_encoder(), tokenizer_2=t5_tokenizer(),
                 transformer=flux_transformer(in_channels, out_channels))
    if encoders:  # Fill and Control have no image_encoder / feature_extractor
        parts |= dict(image_encoder=None, feature_extractor=None)
    return parts


def flux(config: dict = FLUX_DEV):
    from diffusers import FluxPipeline

    return FluxPipeline(**flux_components(config=config))


def flux_img2img():
    from diffusers import FluxImg2ImgPipeline

    return FluxImg2ImgPipeline(**flux_components())


def flux_inpaint():
    from diffusers import FluxInpaintPipeline

    return FluxInpaintPipeline(**flux_components())


def flux_fill():
    from diffusers import FluxFillPipeline

    return FluxFillPipeline(**flux_components(in_channels=12, out_channels=4, encoders=False))


def flux_control():
    from diffusers import FluxControlPipeline

    return FluxControlPipeline(**flux_components(in_channels=8, out_channels=4, encoders=False))


def flux_controlnet():
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    controlnet = _seeded(lambda: FluxControlNetModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]))
    return FluxControlNetPipeline(**flux_components(), controlnet=controlnet)


def qwen_image():
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("vision_token_id", "<|vision_pad|>"), ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"))}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=1024, rope_theta=1e6,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        hidden_size=16, vocab_size=1024, **ids)
    transformer = _seeded(lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4)))
    vae = _seeded(lambda: AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                                 latents_std=[1.0] * 4))
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                             text_encoder=_seeded(lambda: Qwen2_5_VLForConditionalGeneration(cfg).eval()),
                             tokenizer=tokenizer, transformer=transformer)


def sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = _seeded(lambda: SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=flux_vae(latent_channels=4),
        text_encoder=clip_text(True), tokenizer=clip_tokenizer(), text_encoder_2=clip_text(True),
        tokenizer_2=clip_tokenizer(), text_encoder_3=t5_encoder(), tokenizer_3=t5_tokenizer(), image_encoder=None,
        feature_extractor=None)


def pixart_sigma():
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    transformer = _seeded(lambda: PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6))
    return PixArtSigmaPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(), vae=_seeded(AutoencoderKL),
                               transformer=transformer, scheduler=DDIMScheduler())


BUILDERS = {"flux": flux, "flux_schnell": lambda: flux(FLUX_SCHNELL), "flux_img2img": flux_img2img,
            "flux_inpaint": flux_inpaint, "flux_fill": flux_fill, "flux_control": flux_control,
            "flux_controlnet": flux_controlnet, "qwen_image": qwen_image, "sd3": sd3, "pixart_sigma": pixart_sigma}


def _image() -> torch.Tensor:
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1.0
    return mask


def call_kwargs(name: str, steps: int = 4) -> dict:
    """Arguments that work for pipeline `name`, with a fixed generator."""
    common = dict(prompt=PROMPT, num_inference_steps=steps, height=32, width=32, output_type="pt",
                  generator=torch.Generator("cpu").manual_seed(0))
    flux_args = dict(guidance_scale=0.0, max_sequence_length=48)
    extra = {
        "flux": flux_args, "flux_schnell": flux_args,
        "flux_img2img": {**flux_args, "image": _image(), "strength": 0.6},
        "flux_inpaint": {**flux_args, "image": _image(), "mask_image": _mask(), "strength": 0.8},
        "flux_fill": {**flux_args, "image": _image(), "mask_image": _mask()},
        "flux_control": {**flux_args, "control_image": _image()},
        "flux_controlnet": {**flux_args, "control_image": _image(), "controlnet_conditioning_scale": 0.5},
        "qwen_image": dict(true_cfg_scale=1.0, max_sequence_length=16),
        "sd3": dict(guidance_scale=5.0),
        "pixart_sigma": dict(guidance_scale=4.5, use_resolution_binning=False),
    }[name]
    return common | extra


class CallCounter:
    """Counts a module's forward calls (one call = one NFE; CFG is batched) and keeps the last call's kwargs."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.last_kwargs: dict = {}
        self._forward = module.forward

        def counted(*args, **kwargs):
            self.calls += 1
            self.last_kwargs = kwargs
            return self._forward(*args, **kwargs)

        module.forward = counted
