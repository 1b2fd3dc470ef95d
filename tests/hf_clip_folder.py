"""A small randomly initialised transformers CLIP folder, as a hub repo is saved: no CLIP weights
exist offline, so tests that need a second real CLIP (the hf-clip family, a model migration) make one."""

import gzip
from pathlib import Path

import open_clip
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer


def openai_tokenizer() -> CLIPTokenizer:
    simple = open_clip.SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(token, token): i for token, i in simple.encoder.items()}
    with gzip.open(open_clip.tokenizer.default_bpe()) as f:
        merges = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])


def write_hf_clip(folder: Path) -> Path:
    """A small randomly initialised transformers CLIP with OpenAI's tokenizer, saved as a hub repo is."""
    torch.manual_seed(0)
    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config=small | {"max_position_embeddings": 77, "vocab_size": 49408},
        vision_config=small | {"image_size": 32, "patch_size": 8},
        projection_dim=48,
    )
    CLIPModel(config).save_pretrained(folder)
    openai_tokenizer().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
