"""Text tokenizers behind one interface: a word-level one for the shapes configs, Qwen2.5's for real.

* `WordLevelTokenizer`: the shapes vocabulary plus the chat special tokens, built
  deterministically from `shapes.vocabulary_words()` and shipped as `assets/shapes_tokenizer.json`
  (regenerate with `python -m unified_mm.data.tokenizers`; a test checks the shipped file is
  current).
* `HFTokenizer`: a Hugging Face `tokenizer.json` (Qwen2.5) read with the `tokenizers` library (no
  `transformers`); special ids are resolved by name. `<image>` is not in Qwen's vocabulary: it is
  added as a special token, which gives 151665 as in Harmon's inference scripts.

Both encode without adding BOS/EOS (Qwen adds none; the templates place every special token).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from unified_mm.data import shapes, templates

ASSET_PATH = pathlib.Path(__file__).with_name("assets") / "shapes_tokenizer.json"
SPECIAL_TOKENS: tuple[str, ...] = (
    templates.PAD,
    templates.ENDOFTEXT,
    templates.IM_START,
    templates.IM_END,
    templates.IMAGE_PLACEHOLDER,
    templates.UNK,
)
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
# Words, numbers, a newline, or any other single non-space character.
_WORD_RE = re.compile(r"[A-Za-z]+|[0-9]+|\n|[^\sA-Za-z0-9]")
_NO_SPACE_BEFORE = frozenset(".,:;?!")


@runtime_checkable
class Tokenizer(Protocol):
    """What the pipeline, trainer and samplers use. Ids are plain Python ints."""

    vocab_size: int
    pad_id: int
    eos_id: int
    image_token_id: int
    im_start_id: int
    im_end_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str: ...


def build_shapes_vocabulary() -> list[str]:
    """Special tokens, newline, then every word/punctuation of the shapes texts, sorted."""
    words: set[str] = set()
    for text in shapes.vocabulary_words():
        for piece in _SPECIAL_RE.split(re.sub(r"\{[a-z0-9_]+\}", " ", text)):
            if piece and piece not in SPECIAL_TOKENS:
                words.update(_WORD_RE.findall(piece))
    words.discard("\n")
    return [*SPECIAL_TOKENS, "\n", *sorted(words)]


def write_shapes_tokenizer_asset(path: str | os.PathLike = ASSET_PATH) -> pathlib.Path:
    """Regenerates the shipped vocabulary file (run after editing templates or shapes texts)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": "unified_mm.word_level.v1", "tokens": build_shapes_vocabulary()}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


class WordLevelTokenizer:
    """Whitespace/punctuation word tokenizer over a fixed vocabulary; unknown words -> `<unk>`.

    `decode(encode(text)) == text` for canonical text: single spaces between words, none before
    `.,:;?!`, none around newlines and special tokens (every template and shapes text is).
    """

    def __init__(self, tokens: Sequence[str]):
        missing = [t for t in SPECIAL_TOKENS if t not in tokens]
        if missing:
            raise ValueError(f"word-level vocabulary lacks special tokens {missing}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("word-level vocabulary has duplicate tokens")
        self.tokens = list(tokens)
        self._ids = {t: i for i, t in enumerate(self.tokens)}
        self.vocab_size = len(self.tokens)
        self.pad_id = self._ids[templates.PAD]
        self.endoftext_id = self._ids[templates.ENDOFTEXT]
        self.im_start_id = self._ids[templates.IM_START]
        self.im_end_id = self._ids[templates.IM_END]
        # Instruct models end a turn with <|im_end|>: that is the EOS generation stops at.
        self.eos_id = self.im_end_id
        self.image_token_id = self._ids[templates.IMAGE_PLACEHOLDER]
        self.unk_id = self._ids[templates.UNK]
        self._special_ids = frozenset(self._ids[t] for t in SPECIAL_TOKENS)

    @classmethod
    def from_file(cls, path: str | os.PathLike = ASSET_PATH) -> WordLevelTokenizer:
        path = pathlib.Path(path)
        if not path.is_file():
            raise ValueError(f"word-level tokenizer file {path} does not exist")
        data = json.loads(path.read_text())
        if data.get("format") != "unified_mm.word_level.v1":
            raise ValueError(f"{path} is not a unified_mm word-level tokenizer file")
        return cls(data["tokens"])

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in _SPECIAL_RE.split(text):
            if not piece:
                continue
            if piece in self._ids and piece in SPECIAL_TOKENS:
                ids.append(self._ids[piece])
                continue
            ids.extend(self._ids.get(w, self.unk_id) for w in _WORD_RE.findall(piece))
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        out: list[str] = []
        prev_glue = True  # no space after the start, a newline or a special token
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            if skip_special_tokens and i in self._special_ids:
                continue
            tok = self.tokens[i]
            glue = i in self._special_ids or tok == "\n"
            if out and not prev_glue and not glue and tok not in _NO_SPACE_BEFORE:
                out.append(" ")
            out.append(tok)
            prev_glue = glue
        return "".join(out)


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (e.g. Qwen2.5) through the `tokenizers` library."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        image_token: str = templates.IMAGE_PLACEHOLDER,
        pad_token: str = templates.ENDOFTEXT,
        eos_token: str = templates.IM_END,
    ):
        import tokenizers

        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"tokenizer file {path} does not exist")
        self.path = str(path)
        self._init_args = {
            "path": self.path,
            "image_token": image_token,
            "pad_token": pad_token,
            "eos_token": eos_token,
        }
        self._tok = tokenizers.Tokenizer.from_file(self.path)
        if self._tok.token_to_id(image_token) is None:
            # Harmon adds <image> at inference as a new special token (id len(tokenizer)).
            self._tok.add_special_tokens([tokenizers.AddedToken(image_token, special=True)])
        self.image_token = image_token
        self.im_start_id = self._require(templates.IM_START)
        self.im_end_id = self._require(templates.IM_END)
        self.endoftext_id = self._require(templates.ENDOFTEXT)
        self.pad_id = self._require(pad_token)
        self.eos_id = self._require(eos_token)
        self.image_token_id = self._require(image_token)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _require(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer {self.path} has no token {token!r}")
        return int(i)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # `tokenizers.Tokenizer` pickles, but rebuilding from the path keeps worker payloads small.
    def __getstate__(self) -> dict[str, Any]:
        return dict(self._init_args)

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.__init__(**state)


TOKENIZER_KINDS: tuple[str, ...] = ("shapes_word", "hf")


def make_tokenizer(tok_cfg: Any) -> Tokenizer:
    """From `data_cfg.tokenizer`: kind "shapes_word" (path optional: the shipped asset) or "hf"."""
    kind = tok_cfg.kind
    path = getattr(tok_cfg, "path", "") or ""
    if kind == "shapes_word":
        return WordLevelTokenizer.from_file(path or ASSET_PATH)
    if kind == "hf":
        if not path:
            raise ValueError("data.tokenizer.path must point to a tokenizer.json for kind 'hf'")
        return HFTokenizer(
            path,
            image_token=getattr(tok_cfg, "image_token", templates.IMAGE_PLACEHOLDER),
            pad_token=getattr(tok_cfg, "pad_token", templates.ENDOFTEXT),
            eos_token=getattr(tok_cfg, "eos_token", templates.IM_END),
        )
    raise ValueError(f"unknown tokenizer kind {kind!r}; known: {', '.join(TOKENIZER_KINDS)}")


if __name__ == "__main__":
    print(f"wrote {write_shapes_tokenizer_asset()}")
