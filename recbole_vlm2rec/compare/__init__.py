"""``vlm2rec-compare``: several models on one dataset, same split and evaluation, one results table.

Usage::

    vlm2rec-compare --dataset=NAME --models=SASRec,GRU4Rec,BERT4Rec,FDSA,SASRecF,VLM2Rec,VLM2RecSASRec
                    [--variant 'NAME=MODEL --key=value ...' ...] [--variants FILE]
                    [--config_files="a.yaml b.yaml"] [--model_config ROW=FILE ...] [--seeds=1,2,3]
                    [--protocol=full|uni100] [--out=DIR] [--run_timeout=SECONDS] [--key=value ...]

What it does:

* A row of the table is a model of ``--models`` (named by the model) or a *variant*: a model with settings
  of its own, named by what it is, e.g.
  ``--variant 'VLM2RecSASRec + MiniLM text=VLM2RecSASRec --feature_prefix=data/office/features/office'``
  (repeatable), or from a YAML file, ``--variants FILE`` holding ``{NAME: {model: MODEL, <key>: <value>}}``.
  A variant's settings replace the command's ``--key=value`` of the same keys (a ``feature_prefix`` of its own
  also replaces the hand-off below); its run folders are named after it (``A + B text`` ->
  ``A_+_B_text-seed<S>``).

* Every (model, seed) runs in its own subprocess (``python -m recbole_vlm2rec.compare --child REQUEST``),
  so that a crash or an out-of-memory in one model never takes the others down and RecBole's global state
  (logging, seeds) starts clean. The run's folder is ``<out>/runs/<model>-seed<S>/``: ``request.json``
  (what was asked), ``run.log`` (everything the run printed), ``saved/`` (its ``checkpoint_dir``) and, when it
  finished, ``result.json`` (written atomically: best validation, test result, train / validation / test
  evaluation times, parameter counts and, for VLM2Rec, the modality-dropout table and the export paths).
  The run itself is ``recbole_vlm2rec.run.run_recbole``, the same code as the ``run_recbole`` command.
* Same evaluation for every model: ``metrics: [Hit, NDCG]``, ``topk: [10, 20]``, ``valid_metric: NDCG@10``
  are imposed (they override config files); the split is the dataset's (``eval_args`` from its properties or
  your config files). ``--protocol=full`` ranks against every item, ``--protocol=uni100`` against 100
  uniformly sampled negatives (only ``eval_args.mode`` changes; the split is kept). Without ``--protocol``
  the configured mode is used, and the table names it.
* What a model exports and reads besides the interactions is declared by the model (``exports`` /
  ``consumes`` class attributes; ``registry.MODEL_INPUTS`` for RecBole's built-ins), never named by this
  command's code:

  - models that read discrete item features (FDSA, SASRecF) get the dataset tools' ones:
    ``selected_features`` = those of ``categories`` and ``brand`` that ``load_col`` loads for items, unless
    your config sets ``selected_features``;
  - a model that reads item embeddings (VLM2RecSASRec) gets those of a model that exports them (VLM2Rec):
    when both are requested, the producer runs first for each seed and the consumer gets
    ``--feature_prefix=<that run's export>/item_embeddings`` (if that run failed, so does this one, saying
    why). Otherwise it uses your ``feature_prefix``, or the newest export of the dataset under your
    ``checkpoint_dir`` (default ``saved/``), or fails with an error naming where it looked.
* ``--config_files`` apply to every model; settings for one model belong in its properties file or in a
  file passed for that model only with ``--model_config MODEL=FILE`` (repeatable; applied after
  ``--config_files``). Any other ``--key=value`` goes to every model's RecBole ``Config`` (highest priority);
  ``seed`` and ``checkpoint_dir`` are set per run by this command and cannot be passed.

Resuming: a run whose ``result.json`` exists and was made with the same settings (dataset, protocol, config
files and their content, ``--key=value`` arguments; for a consumer, the same producer run) is skipped;
anything else is (re)run from scratch. Kill the command at any time and start it again with the same
arguments: finished runs are kept. Delete a run's ``result.json`` (or its folder) to redo it.

Outputs in ``--out`` (default ``compare/<dataset>``), rewritten after every run:

* ``results.csv`` / ``results.md``: one row per model, mean and (sample) standard deviation over the seeds
  that finished of Hit@10, NDCG@10, Hit@20, NDCG@20, training time, evaluation time; parameter count.
  Failed runs are listed with the last line of their log and the log's path.
* ``runs.csv``: one row per (model, seed).
* ``modality.csv`` / ``modality.md`` (when a model reported it, e.g. VLM2Rec): fused, text-only and
  image-only NDCG@10 / Hit@10.
* ``results.png``: NDCG@10 and Hit@10 per model, grouped bars with standard-deviation error bars (written
  at the end).

Times: ``train`` is ``trainer.fit`` without its per-epoch validation (for VLM2Rec it includes the export of
the item embeddings); ``eval`` is the final test evaluation (for VLM2Rec with the text-only and image-only
passes); the validation time is in ``runs.csv``.

Exit codes: 0 when at least one model finished at least one run (failed runs are reported in the table and
on stderr); 1 when every run of every model failed; 2 bad command line (unknown model or dataset, bad
``--seeds``, missing config file); 130 interrupted.

Modules: ``cli`` (command line, checks, exit codes), ``plan`` (the runs, their order, settings, hand-offs
and fingerprints), ``inputs`` (what a consumed input is and how a run gets it), ``supervise`` (child
processes, timeouts, interrupts, resumption), ``child`` (what runs inside a child), ``reports`` (CSV,
Markdown, PNG), ``files`` (atomic writes, log tails).
"""
from recbole_vlm2rec.compare.cli import main

__all__ = ["main"]
