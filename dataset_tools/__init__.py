"""Dataset tools of recbole-vlm2rec (the ``vlm2rec-data`` command): raw catalogs -> RecBole datasets.

A "ground floor" package: numpy, pandas, PIL, tqdm and the standard library only; it never imports
``recbole`` or ``recbole_vlm2rec`` (they import it).

Output of every subcommand, ``DIR/NAME/``:

* ``NAME.inter``       RecBole interactions: ``user_id:token item_id:token [rating:float] timestamp:float``
* ``NAME.item``        RecBole item features: ``item_id:token categories:token_seq brand:token image:token``
* ``NAME.text.jsonl``  exact item text for prompts, one JSON object per item (read it with
  :func:`dataset_tools.atomic.read_item_sidecar`)
* ``images/``          one RGB square JPEG/PNG per item, and ``NAME.images.jsonl``, the resumable manifest
* ``NAME.stats.json``  counts, filters, problems; written last, so it marks a complete conversion
* ``NAME.problems.jsonl``  every bad input, with ``file:line`` or ``item <id>``
* synthetic datasets only: ``raw/`` (the Amazon-2023-format source) and ``NAME.latent.json``

Modules, one concern each:

=================  ==========================================================================
``cli``            argparse front end, printed summary, exit codes
``convert``        the Amazon pipeline (read, filter, images, write) and the summary text
``amazon``         readers of the 2014/2018/2023 reviews and metadata, release detection
``preprocess``     interaction table, dedupe, minimum rating, k-core, time order (vectorised)
``images``         local/downloaded images: verify, RGB, resize, resumable manifest
``atomic``         atomic writes, RecBole atomic files, the text sidecar reader
``synthetic``      generated catalog with planted text and image attributes, oracle scorers
``demo``           the ``vlm2rec-demo`` dataset, built atomically on first use
``sequences``      per-user item lists -> ``NAME.inter``
``problems``       bad-record collector and the fatal-input exception
=================  ==========================================================================
"""
