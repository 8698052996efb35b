"""The published model card: Hub front matter, the trigger word, settings, metrics and the validation prompts."""
from __future__ import annotations

import yaml

from flux_ray.publish.model_card import render
from flux_ray.spec import load_spec


def _spec(tmp_path, demo_data_dir, **dataset):
    return load_spec(data={"name": "card", "model": {"model_flavour": "dev"},
                           "datasets": [{"id": "d", "instance_data_dir": demo_data_dir, **dataset}],
                           "eval": {"validation_prompt": "[trigger] on a beach", "validation_step_interval": 10},
                           "output": {"uri": str(tmp_path / "out")}, "cache": {"uri": str(tmp_path / "cache")}})


def test_card_names_base_model_trigger_word_settings_and_validation(tmp_path, demo_data_dir):
    spec = _spec(tmp_path, demo_data_dir, trigger_word="ohwx dog")
    summary = {"steps": 100, "final_loss": 0.31234, "eval_loss": 0.29, "seconds": 61.0}
    card = render(spec, summary, ["pytorch_lora_weights.safetensors", "comfyui/card.safetensors"],
                  ["validation/step-000100.png"])
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "black-forest-labs/FLUX.1-dev" and meta["instance_prompt"] == "ohwx dog"
    assert "lora" in meta["tags"] and meta["library_name"] == "diffusers"
    assert "Put `ohwx dog` in the prompt." in card
    assert "| `comfyui/card.safetensors` | comfyui |" in card and "| lora_rank | 16 |" in card
    assert "| final train loss | 0.3123 |" in card and "| steps | 100 |" in card
    assert "- validation: `ohwx dog on a beach`" in card  # the prompt as rendered
    assert "![step-000100.png](validation/step-000100.png)" in card
    assert "weight_name='pytorch_lora_weights.safetensors'" in card


def test_card_without_trigger_word_or_validation(tmp_path, demo_data_dir):
    card = render(_spec(tmp_path, demo_data_dir), {"steps": 5}, ["comfyui/card.safetensors"], [])
    assert "instance_prompt" not in card and "## Trigger word" not in card and "## Validation" not in card
    assert "## Use with diffusers" not in card  # no diffusers file published
