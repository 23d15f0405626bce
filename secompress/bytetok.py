"""A byte-level tokenizer built locally (no hub download).

Ids 0..255 are the raw bytes, then ``<bos>``, ``<eos>``, ``<pad>``. Every encoded
sequence starts with ``<bos>``: a fixed first token is what lets attention sinks and
massive activations form on the first position (Gu et al. 2024; Sun et al. 2024).
"""
from __future__ import annotations

BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map (what ByteLevel pre-tokenizers use)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def build_byte_tokenizer(model_max_length: int = 4096):
    """Return a ``PreTrainedTokenizerFast`` whose ids equal byte values (plus 3 specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab.update({"<bos>": BOS_ID, "<eos>": EOS_ID, "<pad>": PAD_ID})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        model_max_length=model_max_length,
    )
