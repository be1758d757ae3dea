"""A throwaway tiny policy for engine tests: a randomly initialised Llama with a character-level tokenizer.

The shipped policy (``assets/toy-policy``) is used whenever it exists; this model stands in while it does
not, and for tests that need a model the repo does not ship (bad configs, other context lengths).
It has the shipped policy's shape: Llama architecture, head_dim 32, a WordLevel character tokenizer
saved through ``PreTrainedTokenizerFast``, float32 safetensors.
"""

from __future__ import annotations

import string
from pathlib import Path

from configs.schema import REPO_ROOT

SHIPPED_POLICY = REPO_ROOT / "assets" / "toy-policy"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list(string.digits + string.ascii_letters + " \n+-*/=()?.,:;'!#")


def shipped_policy_ready() -> bool:
    """True once the trained toy policy has landed in assets/ (config and weights both written)."""
    return (SHIPPED_POLICY / "config.json").is_file() and (SHIPPED_POLICY / "model.safetensors").is_file()


def make_tiny_policy(
    out_dir: Path, *, max_position_embeddings: int = 256, hidden_size: int = 64, num_layers: int = 2, seed: int = 0
) -> Path:
    """Write a random tiny LlamaForCausalLM + char tokenizer into `out_dir`; returns `out_dir`."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=hidden_size // 32,
        head_dim=32,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform next-token distributions; a larger output scale makes them peaked
    # and varied, so entropies spread over a realistic range (some near 0, some near log V).
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
