"""A tiny random BLIP captioner, generated offline: the stand-in for Florence-2 / Qwen-VL in tests.

Saved with its processor (a BERT word-piece tokenizer built from a local vocabulary, a 32 px image processor)
so it loads through ``AutoProcessor`` / ``AutoModelForImageTextToText.from_pretrained`` like a hub model.
Its captions are nonsense; the plumbing around it is what tests check.
"""
from __future__ import annotations

import os
import string
import tempfile
from pathlib import Path

import torch


def build_tiny_captioner(seed: int = 0):
    """(model, processor): a BlipForConditionalGeneration of ~30k parameters and its BlipProcessor."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    letters = string.ascii_lowercase
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters,
                                    *("##" + c for c in letters)]) + "\n")
        tok = BertTokenizer(str(vocab), model_max_length=64)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    config = BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, encoder_hidden_size=16,
                         bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                         pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16),
        projection_dim=16)
    torch.manual_seed(seed)
    return BlipForConditionalGeneration(config), processor


def write_tiny_captioner(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Save the tiny captioner (model + processor) at ``directory``; returns its absolute path."""
    out = Path(directory).expanduser().resolve()
    model, processor = build_tiny_captioner(seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
