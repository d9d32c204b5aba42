#!/usr/bin/env python3
"""Reference token ids for the tests of src/data/gguf_tokenizer.rs, from Hugging Face `tokenizers`.

The tokenizer is rebuilt from the GGUF's own vocabulary and merges, with the pre-tokenizer of
SmolLM2's tokenizer.json: Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False,
use_regex=True)], no normalizer, ByteLevel decoder. (transformers' own GGUF loader is not used for
the ids: for `tokenizer.ggml.pre = smollm` it builds a plain GPT-2 pre-tokenizer without the digit
split; it agrees on text without digits, which this script checks too.)

    python3 -m venv /tmp/hfenv && /tmp/hfenv/bin/pip install tokenizers transformers gguf
    # tokenizers 0.23.3, transformers 5.24.0, gguf 0.19.0 when the test ids were made
    /tmp/hfenv/bin/python scripts/gguf-tokenizer-reference.py
"""
import glob

import gguf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

GGUF = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SPEECH = "data/text/sotu/2021_joseph_r_biden_d.txt"
STRINGS = [
    "Hello world! This is a test.\nNew line\n\nTwo newlines and   multiple   spaces.  ",
    "In 2021, 1,234.5 people paid $3.50 (or 12%) on 3/4/2021 at 10:30am.",
    "naïve café — “quotes” and ‘single’ … 東京 😀 Ωmega",
    "don't I'll we've she'd they're it's I'm DON'T You'RE",
    "    indented code:\n\tdef f(x):\n\t\treturn x**2  # comment\r\n",
    "   leading spaces, trailing spaces   \n \n  ",
]

reader = gguf.GGUFReader(GGUF)
field = lambda k: reader.fields[k].contents()
tokens, merges = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.merges")
tok = Tokenizer(
    models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges])
)
tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ]
)
tok.decoder = decoders.ByteLevel()


def ids(text):
    return tok.encode(text, add_special_tokens=False).ids


print("pre:", field("tokenizer.ggml.pre"), "bos:", field("tokenizer.ggml.bos_token_id"),
      "eos:", field("tokenizer.ggml.eos_token_id"))
for s in STRINGS:
    print(repr(s), ids(s))
for s in ["a\x04b", "x\x04\x04 y", "\x04"]:  # bytes without a token (0x04) are dropped
    print(repr(s), ids(s))
speech = open(SPEECH, encoding="utf-8").read()
print("speech[:2000 chars]", ids(speech[:2000]))
full = ids(speech)
print("speech tokens", len(full), "decodes back:", tok.decode(full) == speech)

# FNV-1a (64 bit) over the little-endian u32 ids of every sotu file, files in name order.
total, h = 0, 0xCBF29CE484222325
for path in sorted(glob.glob("data/text/sotu/*.txt")):
    for i in ids(open(path, encoding="utf-8").read()):
        for b in i.to_bytes(4, "little"):
            h = ((h ^ b) * 0x100000001B3) % 2**64
        total += 1
print("sotu files", len(glob.glob("data/text/sotu/*.txt")), "tokens", total, "fnv1a", hex(h))

# Cross-check: the tokenizer transformers builds from a GGUF (its file reader needs torch, so the
# metadata goes in through gguf-py), on the strings without digits.
from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

meta = {
    "tokenizer_type": field("tokenizer.ggml.model"),
    "pre_tokenizer_type": field("tokenizer.ggml.pre"),
    "tokens": tokens,
    "token_type": field("tokenizer.ggml.token_type"),
    "merges": merges,
    "bos_token_id": field("tokenizer.ggml.bos_token_id"),
    "eos_token_id": field("tokenizer.ggml.eos_token_id"),
}
hf, _ = convert_gguf_tokenizer(field("general.architecture"), meta)
print("transformers' pre-tokenizer:", hf.pre_tokenizer)
checked = 0
for s in STRINGS + [speech[:2000], speech]:
    if not any(c.isdigit() for c in s):
        assert hf.encode(s, add_special_tokens=False).ids == ids(s), s
        checked += 1
print(f"transformers' GGUF tokenizer agrees on the {checked} texts without digits")
