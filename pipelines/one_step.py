"""``OneStepPipeline``: a text-to-image diffusers pipeline that generates in one UNet evaluation.

The UNet is a one-step generator G (e.g. distilled by Score Forgetting Distillation): from noise z it is evaluated
once at the fixed timestep ``init_timestep`` (SiD-LSG / SFD: 625 of SD's 1000, σ_init ≈ 2.5):

    x = √(1 − ᾱ_init)·z,    x_g = (x − √(1 − ᾱ_init)·G(x, t_init, c)) / √ᾱ_init

for an ε-prediction teacher; G is a copy of its teacher, so a v-prediction student maps x_g = √ᾱ_init·x − √(1−ᾱ_init)·G
(the scheduler config's ``prediction_type`` says which, :mod:`pipelines.prediction`).
x_g is decoded by the VAE. It takes the arguments StableDiffusionPipeline takes (prompt, negative_prompt,
num_images_per_prompt, generator, latents, prompt_embeds, output_type, height / width), so evaluation code treats it
as any other model; ``num_inference_steps`` and ``guidance_scale`` are accepted and ignored (guidance was distilled
into G), and a negative prompt has no unconditional branch to act on, so it is ignored with a warning.

    pipe.save_pretrained("circle-sfd")              # a folder of safetensors + model_index.json
    pipe = OneStepPipeline.from_pretrained("circle-sfd")   # or pipelines.load("circle-sfd")

An SDXL student also has SDXL's second text encoder and tokenizer (``text_encoder_2``, ``tokenizer_2``); its prompts
are encoded as SDXL's pipeline encodes them and packed as :func:`pipelines.text.encode` packs them.
"""

from __future__ import annotations

import warnings

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from pipelines.prediction import prediction_type_of, to_x0
from pipelines.text import denoise, encode



def one_step_latents(predict, z: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The one-step map: x = √(1 − ᾱ)·z, x_g = x̂₀ of ``predict(x)``, the generator's output at t_init in its teacher's
    parameterisation (ε: (x − √(1 − ᾱ)·ε̂) / √ᾱ; v: √ᾱ·x − √(1 − ᾱ)·v̂), with ᾱ = ᾱ_init.
    z (B, C, h, w) → x_g (B, C, h, w), computed in fp32 (the network may run in less)."""
    a = alpha_bar.float()
    x = (1 - a).sqrt() * z.float()
    return to_x0(predict(x).float(), x, a, prediction_type)


class OneStepPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["text_encoder_2", "tokenizer_2"]  # SDXL students only

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, init_timestep: int = 625,
                 text_encoder_2=None, tokenizer_2=None):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.register_to_config(init_timestep=int(init_timestep))
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def prediction_type(self) -> str:
        """What G outputs (its teacher's parameterisation): the scheduler config's, saved and loaded with the folder."""
        return prediction_type_of(self.scheduler)

    def _encode(self, prompts: list[str], size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.text_encoder_2 is not None:  # SDXL: its own pipeline over these modules (shared, not copied)
            sdxl = StableDiffusionXLPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                             text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
                                             unet=self.unet, scheduler=self.scheduler, add_watermarker=False)
            return encode(sdxl, prompts, size)
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    def encode_prompt(self, prompt, device=None, num_images_per_prompt: int = 1, do_classifier_free_guidance=False,
                      negative_prompt=None, **unused) -> tuple[torch.Tensor, None]:
        """StableDiffusionPipeline.encode_prompt's contract (what the toolkit's text helpers and membranes call):
        (prompt_embeds, None): there is no unconditional branch to encode."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        with torch.no_grad():
            embeds = self._encode(prompts)
        embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return (embeds.to(device) if device is not None else embeds), None

    def generate_latents(self, z: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """The generator's clean latents x_g from noise z (B, C, h, w), in fp32 (ᾱ conversions in fp32)."""
        t = int(self.config.init_timestep)
        timesteps = torch.full((len(z),), t, device=z.device)
        return one_step_latents(lambda x: denoise(self.unet, x.to(self.unet.dtype), timesteps, prompt_embeds), z,
                                self.scheduler.alphas_cumprod[t].to(z.device, torch.float32), self.prediction_type)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, negative_prompt=None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 height: int | None = None, width: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, **unused):
        # 1. prompts → text conditioning
        c = self.unet.config.in_channels
        h = (height or self.unet.config.sample_size * self.vae_scale_factor) // self.vae_scale_factor
        w = (width or self.unet.config.sample_size * self.vae_scale_factor) // self.vae_scale_factor
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("pass prompt or prompt_embeds")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self._encode(prompts, size=(h * self.vae_scale_factor, w * self.vae_scale_factor))
        if negative_prompt is not None:
            warnings.warn("OneStepPipeline ignores negative_prompt: the one-step generator has no unconditional "
                          "branch (guidance was distilled into it)", stacklevel=2)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0).to(self.unet.dtype)
        n = len(prompt_embeds)
        # 2. noise
        if latents is None:
            gens = generator if isinstance(generator, list) else [generator] * n
            latents = torch.stack([torch.randn((c, h, w), generator=g) for g in gens]) if generator is not None \
                else torch.randn((n, c, h, w))
        z = latents.to(self.unet.device)
        # 3. one evaluation, 4. decode
        x_g = self.generate_latents(z, prompt_embeds.to(self.unet.device))
        if output_type == "latent":
            images = x_g
        else:
            decoded = self.vae.decode((x_g / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
            images = self.image_processor.postprocess(decoded.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
