"""Data layer: the embedded shapes dataset, sources, typed transforms, the Grain pipeline, tokenizers.

Modules (import them directly; this `__init__` imports none of them, so a Grain worker process
loads only what the pickled pipeline needs):

  shapes_render  palette, shape geometry, `render_objects` (the evaluator re-renders with it)
  shapes         `ShapesDataset`, `PromptSpec`, held-out pairs, `geneval_prompts`, vocabulary
  templates      Harmon's chat template and task prompts
  tokenizers     `Tokenizer` protocol, `WordLevelTokenizer`, `HFTokenizer`, `make_tokenizer`
  records        the ArrayRecord record format and checked image decoding (`BadRecord` reasons)
  sources        typed source registry: shapes, tfds, array_record
  transforms     crops, [-1, 1] scaling, prompt encoding with labels, per-task transforms
  permute        O(1) shuffles and weighted mixing for infinite streams
  stats          skip counting and the bad-data stop rule (`BadDataError`)
  config         `default_data_config`, `with_overrides`, `validate_data_config`
  pipeline       `make_train_iterator` -> `TrainIterator`, `make_eval_examples`
"""
