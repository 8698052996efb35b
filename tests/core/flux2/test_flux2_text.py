"""FLUX.2 prompt embeddings against the pipelines' own encode_prompt."""
from __future__ import annotations

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline

from flux_ray.core.flux2 import text as T
from flux_ray.core.flux2.flavours import FLAVOURS
from flux_ray.core.flux2.tiny import TINY_QWEN3, build_text_encoder, qwen3_tokenizer

CAPTIONS = ["a red cube on a table", "two dogs, sunny hill; long caption " * 3]


@pytest.mark.parametrize("flavour", ["klein-4b", "dev"])
def test_encode_captions_equals_pipeline_encode_prompt(tiny_flux2_pipes, flavour):
    pipe, fl = tiny_flux2_pipes[flavour], FLAVOURS[flavour]
    with torch.no_grad():
        ref, ref_ids = pipe.encode_prompt(CAPTIONS, max_sequence_length=48)
    embeds, mask = T.encode_captions(pipe.text_encoder, pipe.tokenizer, CAPTIONS, kind=fl.text_encoder_kind,
                                     layers=fl.text_encoder_layers, max_sequence_length=48)
    assert embeds.shape == ref.shape == (2, 48, 3 * pipe.text_encoder.config.get_text_config().hidden_size)
    assert torch.equal(embeds, ref)
    assert torch.equal(T.text_ids(2, 48), ref_ids)
    assert mask.shape == (2, 48) and mask[1].sum() == 48  # the long caption is truncated
    if flavour == "klein-4b":  # [dev]'s system message alone fills 48 tokens
        assert 0 < mask[0].sum() < 48


def test_running_fewer_layers_keeps_the_stacked_hidden_states():
    """A Qwen3 deeper than the deepest layer used: the early stop must not change layers 9/18/27."""
    torch.manual_seed(1)
    tok = qwen3_tokenizer()
    enc = build_text_encoder("qwen3", len(tok), {**TINY_QWEN3, "num_hidden_layers": 31}).eval()
    ref = Flux2KleinPipeline._get_qwen3_prompt_embeds(enc, tok, CAPTIONS, max_sequence_length=40)
    ours, _ = T.encode_captions(enc, tok, CAPTIONS, kind="qwen3", layers=(9, 18, 27), max_sequence_length=40)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)
    assert enc.config.num_hidden_layers == 31  # restored
    with pytest.raises(ValueError, match="does not exist"):
        T.encode_captions(enc, tok, CAPTIONS, kind="qwen3", layers=(9, 32), max_sequence_length=40)


def test_mistral_conversation_is_the_pipelines():
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    assert T.mistral_messages(["a [IMG] cat"]) == format_input(["a [IMG] cat"])


@pytest.mark.parametrize("flavour, width", [("klein-4b", 7680), ("klein-9b", 12288), ("dev", 15360)])
def test_cache_shape_matches_the_transformer_input(flavour, width):
    fl = FLAVOURS[flavour]
    shapes = T.text_cache_shapes(fl)
    assert shapes == {"prompt_embeds": (512, width), "attention_mask": (512,)}
    assert set(shapes) == set(T.TEXT_COLUMNS)
    assert fl.transformer["joint_attention_dim"] == width
    assert fl.text_encoder_layers == (Flux2KleinPipeline if fl.pipeline_class == "Flux2KleinPipeline"
                                      else Flux2Pipeline).encode_prompt.__defaults__[-1]
