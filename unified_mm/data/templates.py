"""Harmon's chat template and task prompts (harmon_mar.md 2.4, 2.5, 2.7), in one place.

No system prompt (do not use `apply_chat_template`: it inserts Qwen's default system prompt).
The word-level shapes tokenizer is built from these strings too, so editing them means
regenerating `assets/shapes_tokenizer.json` (`python -m unified_mm.data.tokenizers`).
"""

from __future__ import annotations

INSTRUCTION = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
# What follows the instruction in understanding samples: the answer, then SUFFIX (carries loss,
# it is the EOS the model learns to emit), then SEP (no loss; xtuner's qwen_chat layout).
SUFFIX = "<|im_end|>"
SEP = "\n"

GENERATION_PREFIX = "Generate an image: "
# The classifier-free-guidance null prompt of Harmon: a literal sentence, not an empty string.
NULL_PROMPT_INPUT = "Generate an image."
# Understanding question used for records that carry a caption but no question-answer pairs.
CAPTION_QUESTION = "Describe the image."
IMAGE_PLACEHOLDER = "<image>"

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
PAD = "<pad>"
UNK = "<unk>"


def generation_text(caption: str | None) -> str:
    """Full generation prompt; `None` gives the null (unconditional) prompt."""
    if caption is None:
        return INSTRUCTION.format(input=NULL_PROMPT_INPUT)
    return INSTRUCTION.format(input=GENERATION_PREFIX + caption)


def understanding_text_parts(question: str) -> tuple[str, str]:
    """(text before the image span, text after it) of an understanding prompt."""
    before, after = INSTRUCTION.format(input=IMAGE_PLACEHOLDER + "\n" + question).split(
        IMAGE_PLACEHOLDER, 1
    )
    return before, after
