"""Extra tokenizer edge cases, with the ids transformers' CLIPTokenizer gives them.

Writes tests/fixtures/tokenizer-extra/cases.json: [{prompt, ids}] where `ids` is
`tokenizer(prompt).input_ids` (bos + every token + eos, no truncation, no padding) for the SD2
tokenizer in tests/fixtures/sd2-tokenizer. The prompts probe what the main fixtures do not:
NFC, unusual whitespace, per-character lowercasing, typed special tokens, contractions,
control characters, and seeded random strings mixing Unicode categories.

Needs only `transformers` and `tokenizers` (no torch):
    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install transformers==5.24.0
    /tmp/tfenv/bin/python tools/make_tokenizer_cases.py
"""

import json
import pathlib
import random

from transformers import CLIPTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
tok = CLIPTokenizer.from_pretrained(ROOT / "tests/fixtures/sd2-tokenizer")

prompts = [
    "a<|endoftext|>b",
    "A<|ENDOFTEXT|>b <|StartOfText|>",
    "<|startoftext|><|endoftext|>",
    "<|endoftext",
    "ΣΑΣ όσος ΟΔΟΣ",
    "e\u0301 cafe\u0301 A\u030a",
    "İstanbul ǅ ß ẞ ﬀ",
    "a\u3000b\u00a0c\u200bd\u2028e\u2029f\u0085g\u000bh\u000ci",
    "x\x00y\x07z\x7f",
    "it's ''s 'S 'RE we'Ve 'LL'd 'x ' s '",
    "123456 1.5e-3 ٣٤ ⅷ ½ ²",
    "tab\tnew\nline\r\ncarriage",
    "!hello! wow!!! ?!?! !?",
    "a!b!c",
    "hello world" * 3,
    "ＡＢＣ ｱｲｳ",
    "combining: a\u0308\u0301 \u0915\u094d\u0937",
    "emoji zwj 👨‍👩‍👧 flags 🏳️‍🌈 keycap 1️⃣",
    "<lora:name:0.7> [[double]] ((paren)) {{brace}}",
    "under_score hyphen-ated dot.ted slash/ed back\\slash",
    "ALL CAPS PROMPT WITH NUMBERS 42 AND SYMBOLS #$%",
    "\u00e9\u00e8\u00ea\u00eb \u0130\u0131",
    "",
    " ",
    "!",
    "   !   ",
]

rng = random.Random(0)
alphabet = (
    list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789")
    + list(" \t\n!?.,;:'\"()[]{}<>|/\\-_=+*&^%$#@~`")
    + list("éüñçøåßæœÅÉÜ")
    + list("αβγΣσςπЖжЯя")
    + list("東京日本語かなカナ한국")
    + list("٣٤½²ⅷ")
    + ["\u0301", "\u0308", "\u200b", "\u00a0", "\u3000", "🐶", "❤", "\ufe0f", "👍", "🏽"]
    + ["'s", "'t", "'re", "'ll", "<|endoftext|>"]
)
for _ in range(150):
    n = rng.randint(1, 30)
    prompts.append("".join(rng.choice(alphabet) for _ in range(n)))

cases = [{"prompt": p, "ids": tok(p).input_ids} for p in prompts]
out = ROOT / "tests/fixtures/tokenizer-extra"
out.mkdir(parents=True, exist_ok=True)
(out / "cases.json").write_text(json.dumps(cases, ensure_ascii=False, separators=(",", ":")) + "\n")
import transformers, tokenizers  # noqa: E402

(out / "build_info.json").write_text(
    json.dumps(
        {
            "made_by": "tools/make_tokenizer_cases.py",
            "call": "CLIPTokenizer.from_pretrained('tests/fixtures/sd2-tokenizer')(prompt).input_ids",
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "n_cases": len(cases),
        },
        indent=1,
    )
    + "\n"
)
print(f"wrote {len(cases)} cases to {out}")
