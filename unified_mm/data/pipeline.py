"""The Grain training pipeline: per-task source mixtures -> typed transforms -> local step batches.

Global stream model (what makes resume, sharding and worker counts exact):

* Each task t has a global stream of examples at positions g = 0, 1, 2, ...; step s owns
  positions [s * B_t, (s + 1) * B_t) where B_t = task_batch[t] (the GLOBAL per-step count).
  Process p of P takes rows g = s * B_t + p * b_t + j, j < b_t = B_t / P: disjoint contiguous
  slices, whose concatenation in process order is the single-process global batch.
* Position g picks a source by a seeded weighted block mixture (permute.WeightedMixture) and a
  record by that source's own infinitely repeated shuffle (a fresh permutation per epoch).
* A record that fails (records.REASONS) is replaced by a record from the same source at a retry
  position reserved for g, so every step still has exactly b_t rows; the failure is counted.
  More than data.max_retries consecutive failures, or a source failing more than
  data.max_bad_fraction of its records, stops the run with a BadDataError naming the source.
* All randomness of an example (null prompt, crop offset, question choice) comes from
  rng((seed, task, g, attempt)).

So the batch at step s is a pure function of (data config, seed, task_batch, s, process slice):
it does not depend on threads, on the Grain worker count, or on how many steps ran before; the
iterator state is just the step number (plus the skip counts), and it can be restored with a
different worker count.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from unified_mm.data import shapes as shapes_lib
from unified_mm.data.config import TASKS, question_weights_of, validate_data_config
from unified_mm.data.permute import ShuffledStream, WeightedMixture, derive_seed
from unified_mm.data.records import BadRecord
from unified_mm.data.sources import Sample, source_spec
from unified_mm.data.stats import (
    BadDataError,
    SkipStats,
    describe_failures,
    new_accounting,
    reason_column,
)
from unified_mm.data.tokenizers import Tokenizer, make_tokenizer
from unified_mm.data.transforms import (
    GenerationTransform,
    ImageOnlyTransform,
    ImageTransform,
    UnderstandingTransform,
    encode_generation_prompt,
    encode_understanding,
    pick_question,
    to_unit_range,
)

STATE_FORMAT = "unified_mm.data.v1"
_TASK_CODES = {"t2i": 1, "i2t": 2, "image": 3}
# Retry positions of example g live far beyond any position a run reaches (2**42 examples).
_RETRY_BASE = 1 << 42
_ACCOUNTING_KEY = "_accounting"


@dataclasses.dataclass(frozen=True)
class _TaskPlan:
    task: str
    global_batch: int
    local_batch: int
    source_names: tuple[str, ...]
    source_descriptions: tuple[str, ...]
    readers: tuple[Any, ...]
    streams: tuple[ShuffledStream, ...]
    mixture: WeightedMixture
    transform: Any


class StepDataset(grain.MapDataset):
    """Random access over training steps: `ds[s]` is the local batch dict of step s.

    Each task's entry also carries `_accounting` (int64 [n_sources, 1 + len(REASONS)]: used
    records, then failures per reason), which TrainIterator removes and adds to its counts.
    """

    def __init__(
        self, plans: Sequence[_TaskPlan], *, seed: int, process_index: int, max_retries: int
    ):
        super().__init__([])
        self._plans = tuple(plans)
        self._seed = int(seed)
        self._process_index = int(process_index)
        self._max_retries = int(max_retries)

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"StepDataset(tasks={[p.task for p in self._plans]})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step = int(index)
        out = {}
        for plan in self._plans:
            acct = new_accounting(len(plan.readers))
            first = step * plan.global_batch + self._process_index * plan.local_batch
            rows = [self._example(plan, first + j, acct) for j in range(plan.local_batch)]
            batch = {key: np.stack([r[key] for r in rows]) for key in rows[0]}
            batch[_ACCOUNTING_KEY] = acct
            out[plan.task] = batch
        return out

    def _example(self, plan: _TaskPlan, g: int, acct: np.ndarray) -> dict[str, np.ndarray]:
        k, position = plan.mixture(g)
        reader, stream = plan.readers[k], plan.streams[k]
        last = ""
        for attempt in range(self._max_retries + 1):
            if attempt:
                position = _RETRY_BASE + g * max(self._max_retries, 1) + attempt - 1
            rng = np.random.default_rng((self._seed, _TASK_CODES[plan.task], g, attempt))
            try:
                raw = reader[stream(position)]
            except Exception as e:  # the source itself failed (I/O, corrupt container)
                reason, last = "read_error", f"{type(e).__name__}: {e}"
            else:
                try:
                    example = plan.transform(reader.parse(raw, rng), rng)
                    acct[k, 0] += 1
                    return example
                except BadRecord as e:
                    reason, last = e.reason, str(e)
                except Exception as e:
                    reason, last = "transform_error", f"{type(e).__name__}: {e}"
            acct[k, reason_column(reason)] += 1
        raise BadDataError(
            f"data source {plan.source_names[k]!r} ({plan.source_descriptions[k]}): "
            f"{self._max_retries + 1} consecutive records failed for task {plan.task!r} "
            f"(this batch: {describe_failures(acct[k])}; last: {last[:200]})"
        )


class TrainIterator:
    """Yields local batches {task: {name: np.ndarray}} (see `make_train_iterator`).

    State: `get_state()` is a small JSON-serialisable dict ({"format", "step", "stats"}); save it
    with Orbax as `ocp.args.JsonSave(it.get_state())` and restore with
    `it.set_state(mngr.restore(..., args=ocp.args.JsonRestore()))`. Restoring works across worker
    counts and process counts because a batch is a function of the step only.
    """

    def __init__(
        self,
        dataset: StepDataset,
        plans: Sequence[_TaskPlan],
        *,
        threads: int,
        prefetch: int,
        workers: int,
        max_bad_fraction: float,
        min_records_for_check: int,
    ):
        self._dataset = dataset
        self._task_sources = {p.task: p.source_names for p in plans}
        desc = {}
        for p in plans:
            desc.update(zip(p.source_names, p.source_descriptions))
        self._stats = SkipStats(desc)
        self._threads, self._prefetch, self._workers = threads, prefetch, workers
        self._max_bad_fraction = max_bad_fraction
        self._min_records = min_records_for_check
        self._step = 0
        self._it = None

    @property
    def step(self) -> int:
        """Index of the next batch."""
        return self._step

    @property
    def grain_iterator(self) -> grain.DatasetIterator:
        """The underlying Grain iterator (started if needed). Its own state holds only the
        position, not the skip counts, and depends on the worker count: prefer get_state()."""
        if self._it is None:
            self._start()
        return self._it

    def _start(self) -> None:
        ds = self._dataset[self._step :] if self._step else self._dataset
        it_ds = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=self._threads, prefetch_buffer_size=self._prefetch)
        )
        if self._workers:
            from absl import flags

            # mp_prefetch reads absl flags; outside app.run they are unparsed and Grain raises
            # UnparsedFlagAccessError (jax_scaling.md 6.3). Defaults are what we want.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            it_ds = it_ds.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self._workers, per_worker_buffer_size=2)
            )
        self._it = iter(it_ds)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, dict[str, np.ndarray]]:
        if self._it is None:
            self._start()
        batch = next(self._it)
        for task, task_batch in batch.items():
            self._stats.add(self._task_sources[task], task_batch.pop(_ACCOUNTING_KEY))
        self._step += 1
        self._stats.check(self._max_bad_fraction, self._min_records)
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "step": self._step, "stats": self._stats.state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a data iterator state (format {state.get('format')!r})")
        self.close()
        self._step = int(state["step"])
        self._stats.load(state.get("stats", {}))

    def stats(self) -> dict[str, dict[str, int]]:
        """{source: {"used": n, "skipped": n, <reason>: n}} over the batches consumed so far."""
        return self._stats.as_dict()

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()


def _transform(
    task: str, data_cfg: ml_collections.ConfigDict, image_size: int, tokenizer: Tokenizer
):
    if task == "t2i":
        return GenerationTransform(
            ImageTransform(image_size, data_cfg.crop),
            tokenizer,
            data_cfg.max_text_len,
            float(data_cfg.null_prompt_prob),
        )
    if task == "i2t":
        return UnderstandingTransform(
            ImageTransform(image_size, data_cfg.und_crop),
            tokenizer,
            data_cfg.max_und_len,
            data_cfg.image_tokens,
            data_cfg.caption_question,
            int(data_cfg.qa_turns),
            question_weights_of(data_cfg),
        )
    return ImageOnlyTransform(ImageTransform(image_size, data_cfg.crop))


def make_train_iterator(
    data_cfg: ml_collections.ConfigDict,
    *,
    task_batch: Mapping[str, int],
    image_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    tokenizer: Tokenizer | None = None,
) -> TrainIterator:
    """The training iterator of this process.

    task_batch: GLOBAL rows per step per task ("t2i", "i2t", "image"); tasks with 0 rows are left
    out of the batch dicts. Each process gets task_batch[t] // process_count rows per task:
      t2i:   image float32 [n, S, S, 3] in [-1, 1], input_ids / attention_mask int32 [n, Lt]
      i2t:   image, input_ids / attention_mask / labels int32 [n, Lu] (labels -100 off-answer)
      image: image
    """
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer(data_cfg.tokenizer)
    validate_data_config(
        data_cfg,
        task_batch=task_batch,
        image_size=image_size,
        process_count=process_count,
        tokenizer=tokenizer,
    )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside 0..{process_count - 1}")
    readers: dict[str, Any] = {}
    plans = []
    for task in TASKS:
        count = int(task_batch.get(task, 0))
        if not count:
            continue
        mixture = [(n, float(w)) for n, w in data_cfg.mixtures[task].items() if w > 0]
        names = tuple(n for n, _ in mixture)
        specs = {n: source_spec(n, data_cfg.sources[n]) for n in names}
        for n in names:
            if n not in readers:
                readers[n] = specs[n].open(
                    image_size=image_size, max_pixels=data_cfg.max_image_pixels, seed=seed
                )
                if len(readers[n]) == 0:
                    raise ValueError(f"data source {n!r} ({specs[n].describe()}) has no records")
        code = _TASK_CODES[task]
        plans.append(
            _TaskPlan(
                task=task,
                global_batch=count,
                local_batch=count // process_count,
                source_names=names,
                source_descriptions=tuple(specs[n].describe() for n in names),
                readers=tuple(readers[n] for n in names),
                streams=tuple(
                    ShuffledStream(len(readers[n]), derive_seed(seed, code, i))
                    for i, n in enumerate(names)
                ),
                mixture=WeightedMixture([w for _, w in mixture], derive_seed(seed, code, 0x313)),
                transform=_transform(task, data_cfg, image_size, tokenizer),
            )
        )
    dataset = StepDataset(
        plans, seed=seed, process_index=process_index, max_retries=data_cfg.max_retries
    )
    return TrainIterator(
        dataset,
        plans,
        threads=data_cfg.threads,
        prefetch=data_cfg.prefetch,
        workers=data_cfg.workers,
        max_bad_fraction=float(data_cfg.max_bad_fraction),
        min_records_for_check=data_cfg.min_records_for_check,
    )


@dataclasses.dataclass(frozen=True)
class EvalExamples:
    """Deterministic held-out shapes examples with their encoded prompts and metadata.

    t2i_*: generation prompts of the captions [n, Lt]; null_*: the null prompt [Lt];
    i2t_*: understanding prompts without answers [n, Lu] (prompt_len marks where generation starts).
    """

    examples: tuple[shapes_lib.ShapesExample, ...]
    image: np.ndarray
    t2i_input_ids: np.ndarray
    t2i_attention_mask: np.ndarray
    null_input_ids: np.ndarray
    null_attention_mask: np.ndarray
    i2t_input_ids: np.ndarray
    i2t_attention_mask: np.ndarray
    i2t_prompt_len: np.ndarray
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    qtypes: tuple[str, ...]


def make_eval_examples(
    data_cfg: ml_collections.ConfigDict,
    *,
    num: int,
    image_size: int,
    tokenizer: Tokenizer | None = None,
    split: str = "heldout",
    seed: int = 0,
) -> EvalExamples:
    """`num` shapes examples of `split` (indices 0..num-1) with one question each."""
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer(data_cfg.tokenizer)
    validate_data_config(data_cfg, image_size=image_size, tokenizer=tokenizer, check_files=False)
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    ds = shapes_lib.ShapesDataset(split, seed=seed, image_size=image_size)
    examples = tuple(ds[i] for i in range(num))
    t2i = [
        encode_generation_prompt(tokenizer, ex.caption, data_cfg.max_text_len) for ex in examples
    ]
    null_ids, null_mask = encode_generation_prompt(tokenizer, None, data_cfg.max_text_len)
    qs, ans, qts, und = [], [], [], []
    for i, ex in enumerate(examples):
        rng = np.random.default_rng((seed, 0xE7A1, i))
        q, a = pick_question(Sample(ex.image, ex.caption, ex.qa), rng, data_cfg.caption_question)
        qs.append(q)
        ans.append(a)
        qts.append(next(t for qq, aa, t in ex.qa if qq == q and aa == a))
        und.append(
            encode_understanding(
                tokenizer, q, None, image_tokens=data_cfg.image_tokens, max_len=data_cfg.max_und_len
            )
        )
    return EvalExamples(
        examples=examples,
        image=np.stack([to_unit_range(ex.image) for ex in examples]),
        t2i_input_ids=np.stack([x[0] for x in t2i]),
        t2i_attention_mask=np.stack([x[1] for x in t2i]),
        null_input_ids=null_ids,
        null_attention_mask=null_mask,
        i2t_input_ids=np.stack([u["input_ids"] for u in und]),
        i2t_attention_mask=np.stack([u["attention_mask"] for u in und]),
        i2t_prompt_len=np.array([int(u["prompt_len"]) for u in und], np.int32),
        questions=tuple(qs),
        answers=tuple(ans),
        qtypes=tuple(qts),
    )
