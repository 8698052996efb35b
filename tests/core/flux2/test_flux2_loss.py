"""flux2_loss against the step of diffusers' FLUX.2 DreamBooth LoRA scripts, built from diffusers' functions."""
from __future__ import annotations

import pytest
import torch
from diffusers import Flux2KleinPipeline
from peft import LoraConfig

from flux_ray.core.flux2.loss import flux2_loss


def _script_loss(transformer, model_input, prompt_embeds, sigmas, noise, guidance):
    """train_dreambooth_lora_flux2_klein.py's loss lines, with the pipeline's static helpers."""
    model_input_ids = Flux2KleinPipeline._prepare_latent_ids(model_input)
    text_ids = Flux2KleinPipeline._prepare_text_ids(prompt_embeds)
    timesteps = sigmas * 1000.0
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * model_input + s * noise
    packed = Flux2KleinPipeline._pack_latents(noisy)
    if not transformer.config.guidance_embeds:
        guidance = None
    pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                       encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=model_input_ids,
                       return_dict=False)[0]
    pred = Flux2KleinPipeline._unpack_latents_with_ids(pred[:, : packed.size(1)], model_input_ids)
    target = noise - model_input
    return torch.mean(((pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1).mean()


def _inputs(seed=0, text_len=12):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 32, 4, 6, generator=g), torch.randn(2, text_len, 48, generator=g),
            torch.tensor([0.3, 0.85]), torch.randn(2, 32, 4, 6, generator=g))


@pytest.mark.parametrize("flavour", ["klein-4b", "dev"])
def test_flux2_loss_equals_the_dreambooth_script_step(tiny_flux2_pipes, flavour):
    transformer = tiny_flux2_pipes[flavour].transformer
    latents, embeds, sigmas, noise = _inputs()
    guidance = torch.full((2,), 3.5)
    with torch.no_grad():
        ours = flux2_loss(transformer, latents, embeds, sigmas=sigmas, noise=noise, guidance=guidance)
        ref = _script_loss(transformer, latents, embeds, sigmas, noise, guidance)
        other_guidance = flux2_loss(transformer, latents, embeds, sigmas=sigmas, noise=noise,
                                    guidance=torch.full((2,), 1.0))
    assert torch.allclose(ours, ref, rtol=1e-5, atol=0)
    # [dev] embeds guidance, [klein] ignores it
    assert torch.equal(ours, other_guidance) is (flavour == "klein-4b")


def test_dev_without_guidance_is_refused(tiny_flux2_pipes):
    latents, embeds, sigmas, noise = _inputs()
    with pytest.raises(ValueError, match="guidance"):
        flux2_loss(tiny_flux2_pipes["dev"].transformer, latents, embeds, sigmas=sigmas, noise=noise)


def test_loss_trains_a_lora(tiny_flux2_dirs):
    from diffusers import Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel.from_pretrained(tiny_flux2_dirs["klein-4b"], subfolder="transformer")
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_qkv_mlp_proj"],
                                       init_lora_weights="gaussian"))
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=0.5)
    latents, embeds, sigmas, noise = _inputs()
    losses = []
    for _ in range(3):
        loss = flux2_loss(transformer, latents, embeds, sigmas=sigmas, noise=noise)
        opt.zero_grad()
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
