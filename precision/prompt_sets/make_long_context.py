"""Regenerates golden/long-context.jsonl: a deterministic document of about 12,000 characters (several thousand
tokens for BPE tokenizers) with one fact in the middle that the question asks for. Run: python golden/make_long_context.py"""

import json
import random
from pathlib import Path

SUBJECTS = ["The cooling loop", "The scheduler", "The memory controller", "The vector unit", "The interconnect", "The power manager",
            "The compiler pass", "The cache hierarchy", "The DMA engine", "The firmware", "The test harness", "The attention kernel"]
VERBS = ["was measured at", "was tuned to", "stayed near", "was limited to", "settled at", "was logged at"]
UNITS = ["degrees", "microseconds", "gigabytes per second", "percent", "watts", "cycles"]
TAILS = ["during the overnight run.", "after the third firmware update.", "under a full batch of requests.",
         "when both cores were busy.", "in the cold-start test.", "with the deterministic flags enabled."]


def build() -> str:
    rng = random.Random(142857)
    sections = []
    for section in range(1, 25):
        sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.randint(2, 990)} {rng.choice(UNITS)} {rng.choice(TAILS)}" for _ in range(7)]
        if section == 12:
            sentences.insert(3, "The access code for the archive room is AMBER-4471.")
        sections.append(f"Section {section}. " + " ".join(sentences))
    return "Engineering log of the Harbor Lab accelerator bring-up.\n\n" + "\n\n".join(sections)


if __name__ == "__main__":
    question = "\n\nQuestion: according to the log above, what is the access code for the archive room? Answer with the code only."
    record = {"id": "long-context-01", "category": "long-context", "skip_if_too_long": True, "max_new_tokens": 16,
              "messages": [{"role": "user", "content": build() + question}]}
    Path(__file__).with_name("long-context.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
