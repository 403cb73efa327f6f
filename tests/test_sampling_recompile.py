"""Autoregressive sampling keeps static shapes: `text_to_image` compiles its program once per
static setting, never once per AR step, and a second call with new prompts and a new key compiles
nothing (counted from JAX's compile events, which fire for persistent-cache hits too)."""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import pytest
from flax import nnx
from test_inference_cli import smoke_config

from unified_mm.eval import harmon_inference

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class _Compiles:
    """Counts XLA executables built (compiled or loaded from the persistent cache) while active."""

    def __init__(self):
        self.active = False
        self.count = 0
        self.names: list[str] = []

    def __call__(self, event: str, duration: float, **kwargs) -> None:
        if self.active and event == _BACKEND_COMPILE:
            self.count += 1
            self.names.append(str(kwargs.get("fun_name", "?")))

    @contextlib.contextmanager
    def measure(self):
        self.active, self.count, self.names = True, 0, []
        try:
            yield self
        finally:
            self.active = False


_COUNTER = _Compiles()
jax.monitoring.register_event_duration_secs_listener(_COUNTER)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from unified_mm import families

    family = families.build(smoke_config())
    abstract = nnx.eval_shape(lambda: family.build_model(nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    # numpy values: no per-parameter initialiser compiles before the measured calls
    state = jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype), state)
    return nnx.merge(graphdef, state), family.tokenizer


def _t2i(model, tok, prompts, *, num_iter: int, seed: int) -> np.ndarray:
    return harmon_inference.text_to_image(
        model,
        tok,
        prompts,
        image_size=32,
        key=jax.random.key(seed),
        num_iter=num_iter,
        cfg=3.0,
        cfg_schedule="linear",
        temperature=1.0,
        batch_size=2,
    )


def test_second_call_compiles_nothing(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with _COUNTER.measure() as first:
        a = _t2i(model, tok, ["a red circle", "a blue square"], num_iter=4, seed=0)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    assert first.count >= 1, "the first call must build its program"
    size = harmon_inference._t2i_pixels._cache_size()
    with _COUNTER.measure() as second:
        b = _t2i(model, tok, ["a green triangle", "a red square"], num_iter=4, seed=1)
    assert second.count == 0, f"second call compiled {second.names}"
    assert harmon_inference._t2i_pixels._cache_size() == size
    assert not np.array_equal(a, b)  # new prompts and key really went through the sampler


@pytest.mark.parametrize("num_iter", [2, 16])
def test_ar_steps_do_not_compile_per_step(model_and_tokenizer, num_iter):
    model, tok = model_and_tokenizer
    _t2i(model, tok, ["a red circle"], num_iter=3, seed=0)  # warm the helpers (key folding ...)
    with _COUNTER.measure() as c:
        _t2i(model, tok, ["a red circle"], num_iter=num_iter, seed=2)
    # A new num_iter is a new static setting: exactly one program, whatever the step count (16
    # steps = every token of the 4x4 grid decoded one AR step at a time).
    assert c.count == 1, f"{num_iter} AR steps built {c.count} programs: {c.names}"
    with _COUNTER.measure() as again:
        _t2i(model, tok, ["a blue circle"], num_iter=num_iter, seed=3)
    assert again.count == 0, again.names


def test_sampler_program_has_no_host_round_trips(model_and_tokenizer):
    model, tok = model_and_tokenizer
    graphdef, state = nnx.split(model)
    from unified_mm.models.harmon import sampling

    settings = sampling.SampleSettings(
        num_iter=4, cfg=3.0, cfg_schedule="linear", temperature=1.0, image_shape=(4, 4)
    )
    ids = np.zeros((4, 8), np.int32)
    text = str(
        jax.make_jaxpr(
            lambda s, i, m, k: harmon_inference._t2i_pixels(graphdef, s, i, m, k, settings)
        )(state, ids, np.ones_like(ids), jax.random.key(0))
    )
    assert "scan[" in text or "while[" in text  # the AR loop is inside the program
    assert "callback" not in text  # no host round trip inside the loop
