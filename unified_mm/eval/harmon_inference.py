"""Harmon inference used everywhere: training-time previews, the evaluation suite and the CLIs.

* `text_to_image`: prompts -> uint8 images through `sampling.sample_t2i` (rows [cond; null], the
  null prompt is Harmon's literal "Generate an image." in the chat template, right padded), then
  the official pixel conversion `clamp(127.5 x + 128, 0, 255)` truncated to uint8.
* `image_to_text`: uint8 images + questions -> answers through `sampling.image_to_text` (the
  understanding splice, then Qwen2 decoding with the KV cache, greedy or sampled).

Both run one jitted function per static configuration (model graph, sampler settings, shapes):
jax.jit caches on the static arguments, and batches are padded to a fixed row count and text
lengths to a multiple of `_TEXT_BUCKET`, so an evaluation compiles each path once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unified_mm.data import templates
from unified_mm.models.harmon import sampling

_TEXT_BUCKET = 8
DEFAULT_BATCH = 64


def sampling_options(eval_cfg: Any) -> dict:
    """Sampler keyword arguments of `text_to_image` from a config's `eval` section."""
    get = eval_cfg.get if hasattr(eval_cfg, "get") else (lambda k, d=None: getattr(eval_cfg, k, d))
    opts = {
        "num_iter": int(get("num_iter", 64)),
        "cfg": float(get("cfg", 3.0)),
        "cfg_schedule": str(get("cfg_schedule", "constant")),
        "temperature": float(get("temperature", 1.0)),
    }
    steps = get("num_diffusion_steps", None)
    if steps:
        opts["num_diffusion_steps"] = int(steps)
    return opts


def to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] floats -> uint8 like the official scripts (127.5 x + 128, clamped, truncated)."""
    return jnp.clip(127.5 * images.astype(jnp.float32) + 128.0, 0.0, 255.0).astype(jnp.uint8)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host (gathered across processes when the model is sharded over
    several hosts: every process runs the same inference and gets every result)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _bucket(n: int, multiple: int = _TEXT_BUCKET) -> int:
    return -(-n // multiple) * multiple


def _check_known_words(tokenizer, ids: Sequence[int], text: str) -> None:
    unk = getattr(tokenizer, "unk_id", None)
    if unk is not None and unk in ids:
        words = [
            w for w in text.split() if getattr(tokenizer, "unk_id", None) in tokenizer.encode(w)
        ]
        raise ValueError(
            f"prompt {text!r} has words outside the tokenizer's vocabulary: {', '.join(words)}"
        )


def encode_prompts(
    tokenizer, prompts: Sequence[str], *, max_text_len: int | None = None
) -> list[list[int]]:
    """Token ids of each generation prompt (chat template, "Generate an image: ..." prefix)."""
    out = []
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt must be a non-empty string, got {p!r}")
        ids = tokenizer.encode(templates.generation_text(p))
        _check_known_words(tokenizer, ids, p)
        if max_text_len is not None and len(ids) > max_text_len:
            raise ValueError(
                f"prompt {p!r} is {len(ids)} tokens with the template, longer than the model's "
                f"text context (data.max_text_len = {max_text_len})"
            )
        out.append(ids)
    return out


def _pad_rows(
    rows: Sequence[Sequence[int]], length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


@functools.lru_cache(maxsize=16)
def _graphdef_with_diffusion_steps(cfg, steps: int):
    """The graph of a Harmon whose DDPM sampler uses `steps` respaced steps (params unchanged)."""
    from unified_mm.models.harmon.harmon import Harmon

    new = dataclasses.replace(cfg, mar=dataclasses.replace(cfg.mar, num_sampling_steps=str(steps)))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Harmon(new, rngs=nnx.Rngs(0))))
    return graphdef


def _split(model, num_diffusion_steps: int | None):
    graphdef, state = nnx.split(model)
    if num_diffusion_steps is not None:
        if int(num_diffusion_steps) < 1:
            raise ValueError(f"num_diffusion_steps must be >= 1, got {num_diffusion_steps}")
        current = str(model.cfg.mar.num_sampling_steps)
        if current != str(int(num_diffusion_steps)):
            graphdef = _graphdef_with_diffusion_steps(model.cfg, int(num_diffusion_steps))
    return graphdef, state


@functools.partial(jax.jit, static_argnames=("graphdef", "settings"))
def _t2i_pixels(graphdef, state, input_ids, attention_mask, key, settings):
    model = nnx.merge(graphdef, state)
    out = sampling.sample_t2i(model, input_ids, attention_mask, settings=settings, key=key)
    return to_uint8(out["images"])


def text_to_image(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    image_size: int,
    key: jax.Array,
    num_iter: int,
    cfg: float,
    cfg_schedule: str,
    temperature: float,
    num_diffusion_steps: int | None = None,
    batch_size: int | None = None,
    max_text_len: int | None = None,
) -> np.ndarray:
    """uint8 [len(prompts), image_size, image_size, 3] images, one per prompt (repeat a prompt
    for several samples). Chunk c of `batch_size` prompts draws from fold_in(key, c)."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("text_to_image needs at least one prompt")
    stride = model.cfg.stride
    if image_size <= 0 or image_size % stride:
        raise ValueError(
            f"image_size {image_size} is not a positive multiple of the stride {stride}"
        )
    settings = sampling.SampleSettings(
        num_iter=int(num_iter),
        cfg=float(cfg),
        cfg_schedule=str(cfg_schedule),
        temperature=float(temperature),
        image_shape=model.cfg.latent_grid(image_size),
    )
    if settings.num_iter > settings.image_shape[0] * settings.image_shape[1]:
        raise ValueError(
            f"num_iter {num_iter} exceeds the {settings.image_shape[0] * settings.image_shape[1]} "
            f"tokens of a {image_size} px image"
        )
    cond = encode_prompts(tokenizer, prompts, max_text_len=max_text_len)
    null = tokenizer.encode(templates.generation_text(None))
    length = _bucket(max(max(map(len, cond)), len(null)))
    batch = min(int(batch_size or DEFAULT_BATCH), len(prompts))
    graphdef, state = _split(model, num_diffusion_steps)
    out = []
    for c, start in enumerate(range(0, len(prompts), batch)):
        rows = cond[start : start + batch]
        n = len(rows)
        rows = rows + [rows[-1]] * (batch - n)  # fixed row count: one compilation
        if settings.use_cfg:
            rows = rows + [null] * batch
        ids, mask = _pad_rows(rows, length, tokenizer.pad_id)
        images = _t2i_pixels(graphdef, state, ids, mask, jax.random.fold_in(key, c), settings)
        out.append(to_host(images)[:n])
    return np.concatenate(out, axis=0)


# ------------------------------------------------------------------------------------------------
# Understanding


def prepare_images(images: Sequence[np.ndarray] | np.ndarray, image_size: int) -> np.ndarray:
    """uint8 [H, W, 3] images -> float32 [N, S, S, 3] in [-1, 1] (Harmon's expand2square pad with
    grey, bicubic resize, x / 255 * 2 - 1; the training pipeline's understanding transform)."""
    from unified_mm.data.transforms import prepare_image, to_unit_range

    out = []
    for im in images:
        im = np.asarray(im)
        if im.ndim != 3 or im.shape[-1] != 3 or im.dtype != np.uint8:
            raise ValueError(f"expected uint8 [H, W, 3] images, got {im.dtype} {im.shape}")
        out.append(to_unit_range(prepare_image(np.ascontiguousarray(im), image_size, "pad")))
    return np.stack(out)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k"))
def _i2t_ids(
    graphdef,
    state,
    images,
    input_ids,
    attention_mask,
    key,
    temperature,
    *,
    max_new_tokens,
    greedy,
    top_k,
):
    model = nnx.merge(graphdef, state)
    ids, _ = sampling.image_to_text(
        model,
        images,
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        key=key,
        greedy=greedy,
        temperature=temperature,
        top_k=top_k,
    )
    return ids


def understanding_prompts(
    tokenizer, questions: Sequence[str], *, image_tokens: int, max_prompt_len: int | None = None
) -> list[list[int]]:
    """Prompt ids `<|im_start|>user\\n<image>*n\\n{question}<|im_end|>\\n<|im_start|>assistant\\n`."""
    out = []
    for q in questions:
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"question must be a non-empty string, got {q!r}")
        before, after = templates.understanding_text_parts(q)
        ids = (
            tokenizer.encode(before)
            + [tokenizer.image_token_id] * image_tokens
            + tokenizer.encode(after)
        )
        _check_known_words(tokenizer, tokenizer.encode(q), q)
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            raise ValueError(
                f"question {q!r} makes a {len(ids)}-token prompt ({image_tokens} image tokens), "
                f"longer than the model's understanding context (data.max_und_len = {max_prompt_len})"
            )
        out.append(ids)
    return out


def decode_answer(tokenizer, ids: Sequence[int]) -> str:
    """Text of generated ids up to the first EOS, special tokens dropped. Ids past the text
    tokenizer (the LLM vocabulary may be padded beyond it) cannot be written and are dropped."""
    ids = [int(i) for i in ids]
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    ids = [i for i in ids if 0 <= i < tokenizer.vocab_size]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def image_to_text(
    model,
    tokenizer,
    images: Sequence[np.ndarray] | np.ndarray,
    questions: Sequence[str],
    *,
    image_size: int,
    max_new_tokens: int,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    key: jax.Array | None = None,
    batch_size: int | None = None,
    max_prompt_len: int | None = None,
) -> list[str]:
    """One answer per (image, question). Sampling (greedy=False) needs `key`; chunk c of
    `batch_size` rows draws from fold_in(key, c)."""
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images but {len(questions)} questions")
    if not len(images):
        raise ValueError("image_to_text needs at least one image")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and key is None:
        raise ValueError("sampled decoding (greedy=False) needs a jax.random key (--seed)")
    stride = model.cfg.stride
    if image_size <= 0 or image_size % stride:
        raise ValueError(
            f"image_size {image_size} is not a positive multiple of the stride {stride}"
        )
    h, w = model.cfg.latent_grid(image_size)
    image_tokens = h * w + model.cfg.mar.buffer_size
    prompts = understanding_prompts(
        tokenizer, questions, image_tokens=image_tokens, max_prompt_len=max_prompt_len
    )
    pixels = prepare_images(images, image_size)
    length = _bucket(max(map(len, prompts)))
    batch = min(int(batch_size or DEFAULT_BATCH), len(prompts))
    graphdef, state = nnx.split(model)
    answers: list[str] = []
    for c, start in enumerate(range(0, len(prompts), batch)):
        rows = prompts[start : start + batch]
        px = pixels[start : start + batch]
        n = len(rows)
        if n < batch:  # fixed row count: one compilation
            rows = rows + [rows[-1]] * (batch - n)
            px = np.concatenate([px, np.repeat(px[-1:], batch - n, axis=0)])
        ids, mask = _pad_rows(rows, length, tokenizer.pad_id)
        k = None if greedy else jax.random.fold_in(key, c)
        new = _i2t_ids(
            graphdef,
            state,
            px,
            ids,
            mask,
            k,
            jnp.float32(temperature),
            max_new_tokens=int(max_new_tokens),
            greedy=bool(greedy),
            top_k=int(top_k),
        )
        new = to_host(new)[:n]
        answers += [decode_answer(tokenizer, r) for r in new]
    return answers


def model_limits(config: Mapping | Any) -> dict[str, int | None]:
    """(max_text_len, max_und_len) of a config's data section, None when absent."""
    data = config.get("data", None) if hasattr(config, "get") else None
    if data is None:
        return {"max_text_len": None, "max_prompt_len": None}
    return {
        "max_text_len": int(data.get("max_text_len")) if data.get("max_text_len") else None,
        "max_prompt_len": int(data.get("max_und_len")) if data.get("max_und_len") else None,
    }
