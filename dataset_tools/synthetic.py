"""A deterministic multimodal catalog with planted signal, written in the Amazon 2023 raw format.

What is planted (the *latent attributes*, stored only in ``NAME.latent.json``):

* text attribute, a scent theme (:data:`THEMES`): every item's title names its scent family and a
  scent of it, and its description two more ("Everglow Velvet Floral Lavender Face Cream"), among
  words that are random with respect to
  every latent attribute (brand, adjective, product kind, categories);
* image attribute, a pattern (:data:`PATTERNS`): horizontal/vertical/diagonal stripes, checkerboard,
  dots, rings, a cross or a triangle, drawn with a random period, phase and position in two random
  colours plus pixel noise. Colour says nothing about the attribute, so a randomly initialised
  vision model (which separates flat colours well, docs/design.md#synthetic) does not get it for free:
  shape and texture have to be learned. With ``image_colours="random"`` (the default, the demo's) which of
  the two colours is the darker is a coin flip, so a pattern and its negative look alike to linear patch
  features; ``"dark-on-light"`` fixes that polarity (hues stay random), which is what lets the tiny vision
  tower of ``benchmarks/modality_collapse.py`` learn the pattern on CPU.

Users: each has two interests, each a (theme, pattern) pair; a sequence stays with its current
interest (switching with probability :data:`SWITCH`), and each next item is drawn among the items not
yet consumed with weight ``popularity * exp(SHARPNESS * (text_signal * same_theme +
image_signal * same_pattern))``. So the next item depends on both modalities; ``text_signal`` and
``image_signal`` (0..1) set how much. :func:`oracle_hit_rates` scores with the true attributes of a
user's last item: both attributes beat either alone by a wide margin with the default signals.
:func:`attribute_ceilings` gives the expected NDCG/Hit of the same scorers without a popularity
tie-break: what a model that has learnt an attribute, and nothing that tells the items sharing it apart,
can reach.

Every random draw comes from a stream keyed by (seed, purpose, index), so the output is the same
bytes for the same seed and library versions, whatever the order of work.
"""
from __future__ import annotations

import json
import pathlib
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from .atomic import atomic_path, write_json, write_jsonl
from .convert import AmazonJob, Result, convert_amazon, prepare_dataset_dir
from .images import ImageOptions

THEMES = (
    ("floral", ("rose", "jasmine", "lavender", "peony", "lily")),
    ("citrus", ("lemon", "orange", "grapefruit", "lime", "bergamot")),
    ("woody", ("cedar", "sandalwood", "oak", "pine", "vetiver")),
    ("sweet", ("vanilla", "caramel", "honey", "cocoa", "almond")),
    ("fresh", ("mint", "eucalyptus", "cucumber", "aloe", "seaweed")),
    ("fruity", ("berry", "peach", "cherry", "mango", "apple")),
    ("spicy", ("cinnamon", "ginger", "clove", "pepper", "cardamom")),
    ("earthy", ("clay", "moss", "sage", "patchouli", "matcha")),
)
PATTERNS = ("horizontal_stripes", "vertical_stripes", "diagonal_stripes", "checkerboard", "dots", "rings",
            "cross", "triangle")
_PRODUCTS = (("Face Cream", "Skin Care"), ("Serum", "Skin Care"), ("Body Lotion", "Body Care"),
             ("Shampoo", "Hair Care"), ("Lip Balm", "Lip Care"), ("Face Mask", "Skin Care"),
             ("Bar Soap", "Bath"), ("Hair Oil", "Hair Care"), ("Shower Gel", "Bath"),
             ("Body Scrub", "Body Care"), ("Face Mist", "Skin Care"), ("Cleanser", "Skin Care"))
_ADJECTIVES = ("Gentle", "Daily", "Rich", "Light", "Pure", "Soft", "Velvet", "Bright", "Calm", "Silky",
               "Classic", "Nourishing")
_BRANDS = ("Aurelia", "Bloomwell", "Corbelle", "Dewline", "Everglow", "Fernhill", "Glowry", "Hazelby",
           "Ivory Lane", "Juniper", "Kindred", "Lumen")
_REVIEW_WORDS = ("Love it.", "Works well.", "Nice texture.", "Would buy again.", "Smells great.",
                 "A bit pricey.", "Lasts long.", "My favourite.")

IMAGE_COLOURS = ("random", "dark-on-light")
SHARPNESS = 4.0        # how peaked the choice of the next item is around the current interest
SWITCH = 0.25          # probability of switching to the user's other interest at each step
_T0_MS = 1_577_836_800_000   # 2020-01-01, start of the review clock (milliseconds, as in 2023 files)


@dataclass
class SyntheticSpec:
    seed: int = 0
    items: int = 400
    users: int = 1000
    text_signal: float = 1.0
    image_signal: float = 1.0
    image_size: int = 128            # generated (and stored) image side in pixels
    text_values: int = 6             # how many themes are used (at most len(THEMES))
    image_values: int = 6            # how many patterns are used (at most len(PATTERNS))
    image_colours: str = "random"    # random | dark-on-light (see _two_colours)
    min_history: int = 5
    max_history: int = 20

    def check(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        if self.seed < 0:
            raise ValueError(f"the seed must be 0 or more, got {self.seed}")
        if not 1 <= self.text_values <= len(THEMES) or not 1 <= self.image_values <= len(PATTERNS):
            raise ValueError(f"text_values must be 1..{len(THEMES)} and image_values 1..{len(PATTERNS)}")
        if not 1 <= self.min_history <= self.max_history < self.items:
            raise ValueError(f"the catalog needs more items ({self.items}) than the longest history "
                             f"({self.max_history}), and 1 <= min_history <= max_history")
        if self.image_colours not in IMAGE_COLOURS:
            raise ValueError(f"image_colours must be one of {list(IMAGE_COLOURS)}, got {self.image_colours!r}")
        if not (0 <= self.text_signal <= 1 and 0 <= self.image_signal <= 1):
            raise ValueError("text_signal and image_signal must be in [0, 1]")


def _rng(seed: int, purpose: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, purpose, index])


# ------------------------------------------------------------------------------------------- images

def _two_colours(rng: np.random.Generator, colours: str = "random") -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground colours, far enough apart for the pattern to stay visible.

    ``random``: both uniform in RGB, so which one is brighter is a coin flip; ``dark-on-light``: random hues
    too, but the pattern is always darker than its background (a fixed polarity, as print on paper).
    """
    if colours == "dark-on-light":
        return rng.uniform(170, 255, 3), rng.uniform(0, 85, 3)
    bg = rng.uniform(0, 255, 3)
    while True:
        fg = rng.uniform(0, 255, 3)
        if np.linalg.norm(fg - bg) > 120:
            return bg, fg


def draw_pattern(pattern: int, size: int, rng: np.random.Generator, colours: str = "random") -> np.ndarray:
    """An RGB uint8 image of pattern ``PATTERNS[pattern]`` with random geometry and colours."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    period = rng.uniform(0.14, 0.24)
    phase, phase2 = rng.uniform(0, 1, 2)
    cx, cy = rng.uniform(0.35, 0.65, 2)
    name = PATTERNS[pattern]
    if name == "horizontal_stripes":
        mask = (yy / period + phase) % 1 < 0.5
    elif name == "vertical_stripes":
        mask = (xx / period + phase) % 1 < 0.5
    elif name == "diagonal_stripes":
        mask = ((xx + yy) / (period * 1.4142) + phase) % 1 < 0.5
    elif name == "checkerboard":
        mask = (np.floor(xx / period + phase) + np.floor(yy / period + phase2)) % 2 == 0
    elif name == "dots":
        fx = (xx / period + phase) % 1 - 0.5
        fy = (yy / period + phase2) % 1 - 0.5
        mask = fx ** 2 + fy ** 2 < 0.3 ** 2
    elif name == "rings":
        mask = (np.hypot(xx - cx, yy - cy) / period + phase) % 1 < 0.5
    elif name == "cross":
        half = rng.uniform(0.07, 0.12)
        arm = rng.uniform(0.3, 0.42)
        mask = (((np.abs(xx - cx) < half) & (np.abs(yy - cy) < arm))
                | ((np.abs(yy - cy) < half) & (np.abs(xx - cx) < arm)))
    else:  # triangle: apex up, base below, with jittered corners
        h = rng.uniform(0.55, 0.75)
        top, bottom = cy - h / 2, cy + h / 2
        half_base = rng.uniform(0.3, 0.42)
        width_at_y = (yy - top) / h * half_base
        mask = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= width_at_y)
    bg, fg = _two_colours(rng, colours)
    img = np.where(mask[..., None], fg, bg) + rng.normal(0, 10, (size, size, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ catalog

def generate_raw(raw_dir: pathlib.Path, spec: SyntheticSpec, progress: bool = True) -> dict:
    """Write ``raw_dir/{reviews.jsonl, meta.jsonl, images/}`` (Amazon 2023 format); return the latents.

    One function of ~80 lines on purpose: it is the generative story of the catalog (latents, then items,
    then users' sequences) in the order it happens, and the latents it returns are what the tests check.
    """
    spec.check()
    raw_dir = pathlib.Path(raw_dir)
    (raw_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = _rng(spec.seed, 0)
    # Balanced attributes: each theme and each pattern on about the same number of items, independently.
    theme = rng.permutation(np.arange(spec.items) % spec.text_values)
    pattern = rng.permutation(np.arange(spec.items) % spec.image_values)
    popularity = rng.gamma(2.0, 1.0, spec.items)
    item_ids = [f"S{spec.seed % 1000:03d}{k:06d}" for k in range(spec.items)]

    meta = []
    for k in tqdm(range(spec.items), desc="synthetic items", disable=None if progress else True):
        r = _rng(spec.seed, 1, k)
        words = r.choice(THEMES[theme[k]][1], 3, replace=False)
        product, category = _PRODUCTS[r.integers(len(_PRODUCTS))]
        adjective = _ADJECTIVES[r.integers(len(_ADJECTIVES))]
        brand = _BRANDS[r.integers(len(_BRANDS))]
        image_file = f"images/{item_ids[k]}.png"
        with atomic_path(raw_dir / image_file) as tmp:
            Image.fromarray(draw_pattern(int(pattern[k]), spec.image_size, r, spec.image_colours)).save(tmp, format="PNG")
        meta.append({
            "main_category": "All Beauty",
            # The scent family is named in the title, as real catalogs do ("Floral Rose Lip Balm"): the text
            # attribute is then one shared word away, learnable in minutes by the demo's tiny random VLM.
            "title": f"{brand} {adjective} {THEMES[theme[k]][0].capitalize()} {words[0].capitalize()} {product}",
            "average_rating": round(float(r.uniform(3.5, 5.0)), 1),
            "rating_number": int(r.integers(5, 500)),
            "features": [f"{int(r.integers(2, 20)) * 25} ml", "Made in small batches"],
            "description": [f"{adjective} {product.lower()} with notes of {words[1]} and {words[2]}."],
            "price": round(float(r.uniform(4, 60)), 2),
            "images": [{"thumb": None, "large": image_file, "variant": "MAIN", "hi_res": None}],
            "videos": [],
            "store": brand,
            "categories": ["Beauty & Personal Care", category],
            "details": {},
            "parent_asin": item_ids[k],
            "bought_together": None,
        })

    # Sampling weights of every item for every (theme, pattern) interest.
    cells = [(t, v) for t in range(spec.text_values) for v in range(spec.image_values)]
    same_t = theme[None, :] == np.array([t for t, _ in cells])[:, None]
    same_v = pattern[None, :] == np.array([v for _, v in cells])[:, None]
    weights = popularity[None, :] * np.exp(SHARPNESS * (spec.text_signal * same_t + spec.image_signal * same_v))
    cell_sizes = np.array([np.sum((theme == t) & (pattern == v)) for t, v in cells], dtype=np.float64)

    reviews, users = [], {}
    for u in range(spec.users):
        r = _rng(spec.seed, 2, u)
        user_id = f"U{u:06d}"
        interests = r.choice(len(cells), 2, replace=False, p=cell_sizes / cell_sizes.sum())
        users[user_id] = {"interests": [list(cells[c]) for c in interests]}
        length = int(r.integers(spec.min_history, spec.max_history + 1))
        current = int(r.integers(2))
        consumed = np.zeros(spec.items, dtype=bool)
        clock = _T0_MS + int(r.integers(0, 365 * 86_400_000))
        for step in range(length):
            if step and r.random() < SWITCH:
                current = 1 - current
            w = np.where(consumed, 0.0, weights[interests[current]])
            j = int(np.searchsorted(np.cumsum(w), r.random() * w.sum(), side="right"))
            consumed[j] = True
            clock += int(r.integers(3_600_000, 30 * 86_400_000))
            reviews.append({
                "rating": float(r.integers(3, 6)), "title": "Review", "text": str(r.choice(_REVIEW_WORDS)),
                "images": [], "asin": item_ids[j], "parent_asin": item_ids[j], "user_id": user_id,
                "timestamp": clock, "helpful_vote": 0, "verified_purchase": True,
            })
    write_jsonl(raw_dir / "meta.jsonl", meta)
    write_jsonl(raw_dir / "reviews.jsonl", reviews)
    return {
        "spec": asdict(spec),
        "text_attribute": {"name": "scent_theme", "values": [t for t, _ in THEMES[:spec.text_values]]},
        "image_attribute": {"name": "pattern", "values": list(PATTERNS[:spec.image_values])},
        "items": {item_ids[k]: {"text": int(theme[k]), "image": int(pattern[k])} for k in range(spec.items)},
        "users": users,
    }


def build_synthetic(out, name: str, spec: SyntheticSpec, kcore: int = 5, image_format: str = "png",
                    progress: bool = True) -> Result:
    """Generate ``out/name/raw/`` and convert it into ``out/name/`` (plus ``name.latent.json``)."""
    dataset_dir = prepare_dataset_dir(out, name)
    raw_dir = dataset_dir / "raw"
    latent = generate_raw(raw_dir, spec, progress)
    write_json(dataset_dir / f"{name}.latent.json", latent)
    return convert_amazon(AmazonJob(
        reviews=raw_dir / "reviews.jsonl", meta=raw_dir / "meta.jsonl", out=pathlib.Path(out), dataset=name,
        version="2023", kcore=kcore, progress=progress,
        images=ImageOptions(size=spec.image_size, fmt=image_format, workers=1),
        # Paths relative to the dataset directory: the demo is built elsewhere and renamed into place.
        source_extra={"kind": "synthetic", "seed": spec.seed, "reviews": "raw/reviews.jsonl",
                      "meta": "raw/meta.jsonl", "latent": f"{name}.latent.json"}))


def read_latent(dataset_dir, name: str) -> dict:
    path = pathlib.Path(dataset_dir) / f"{name}.latent.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no latent attributes (only synthetic datasets have them)")
    return json.loads(path.read_text(encoding="utf-8"))


def _planted_sequences(dataset_dir, name: str):
    """``(theme, pattern, signals, sequences)`` of a converted synthetic dataset: each item's planted attributes
    (arrays indexed by the sorted item ids), the generator's (text_signal, image_signal), and every user's items
    in time order (as indices), users sorted by id."""
    latent = read_latent(dataset_dir, name)
    inter = pd.read_csv(pathlib.Path(dataset_dir) / f"{name}.inter", sep="\t", dtype=str, keep_default_na=False)
    inter.columns = [c.split(":")[0] for c in inter.columns]
    inter["timestamp"] = inter["timestamp"].astype(float)
    items = sorted(set(inter["item_id"]))
    index = {it: n for n, it in enumerate(items)}
    theme = np.array([latent["items"][it]["text"] for it in items])
    pattern = np.array([latent["items"][it]["image"] for it in items])
    sequences = [[index[x] for x in g["item_id"]]
                 for _, g in inter.sort_values(["user_id", "timestamp"], kind="stable").groupby("user_id", sort=True)]
    return theme, pattern, (latent["spec"]["text_signal"], latent["spec"]["image_signal"]), sequences


def _attribute_scores(theme, pattern, last: int, signals, blank: str) -> dict:
    """Every oracle scorer's score of every item: agreement with the attributes of item ``last``, ``both``
    weighing theme and pattern matches by the generator's ``signals``, ``text`` and ``image`` one attribute
    each, ``blank`` none (all zero)."""
    same_theme, same_pattern = theme == theme[last], pattern == pattern[last]
    weights = {"both": signals, "text": (1.0, 0.0), "image": (0.0, 1.0), blank: (0.0, 0.0)}
    return {scorer: a * same_theme + b * same_pattern for scorer, (a, b) in weights.items()}


def oracle_hit_rates(dataset_dir, name: str, k: int = 10) -> dict:
    """Hit@k of the last item of each user for scorers that know the true latent attributes.

    The target is each user's last item; each scorer ranks the items not in the user's history by
    agreement with the attributes of the last history item: ``both`` weighs theme and pattern matches
    by the generator's signals, ``text`` and ``image`` use one attribute, ``popularity`` none. Ties
    are broken by how often items occur in the histories.
    """
    theme, pattern, signals, sequences = _planted_sequences(dataset_dir, name)
    counts = np.zeros(len(theme))
    for seq in sequences:
        np.add.at(counts, seq[:-1], 1)
    tie_break = 1e-3 * counts / max(counts.max(), 1)
    hits = {}
    for seq in sequences:
        last, target = seq[-2], seq[-1]
        for scorer, score in _attribute_scores(theme, pattern, last, signals, "popularity").items():
            score = score + tie_break
            score[seq[:-1]] = -np.inf
            hits[scorer] = hits.get(scorer, 0) + int(np.sum(score > score[target]) < k)
    return {scorer: h / len(sequences) for scorer, h in hits.items()}


def attribute_ceilings(dataset_dir, name: str, k: int = 10, exclude_history: bool = False) -> dict:
    """Expected Hit@k and NDCG@k of scorers that know only the planted attributes, per evaluation split.

    Leave-one-out as RecBole's ``LS: valid_and_test``: the ``valid`` target is each user's second-to-last
    item, the ``test`` target the last, and the items before it are the history. ``exclude_history=False``
    ranks the history items too, as RecBole's full ranking does for sequential models (VLM2Rec, SASRec: their
    evaluation batches carry no history index), so the ceiling reads on the same scale as their metrics; the
    generator never repeats an item, so a history item is never the target but does compete with it.
    Each scorer ranks by agreement with the attributes of the last history item (``both`` weighs theme and
    pattern by the generator's signals, ``text`` and ``image`` use one, ``none`` nothing) and orders equally
    scored items at random; the numbers are the exact expectations over that order, not a sample. Unlike
    :func:`oracle_hit_rates` nothing breaks ties by popularity: this is what knowing an attribute is worth to
    a model that cannot otherwise tell the items sharing it apart, i.e. the ceiling of a uni-modal model that
    has learnt its attribute perfectly and no item identity.

    Returns ``{"valid"|"test": {"both"|"text"|"image"|"none": {"hit@k": h, "ndcg@k": n}}}``.
    """
    theme, pattern, signals, sequences = _planted_sequences(dataset_dir, name)
    gains = 1.0 / np.log2(np.arange(2, k + 2))  # the NDCG of the one relevant item at rank 1..k
    result = {}
    for split, cut in (("valid", 1), ("test", 0)):
        sums, users = {}, 0
        for seq in sequences:
            seq = seq[:len(seq) - cut]
            if len(seq) < 2:
                continue
            history, target = seq[:-1], seq[-1]
            users += 1
            for scorer, score in _attribute_scores(theme, pattern, history[-1], signals, "none").items():
                if exclude_history:
                    score[history] = -np.inf
                above = int(np.sum(score > score[target]))
                tied = int(np.sum(score == score[target]))  # the target and the items it ties with
                ranks = np.arange(above, above + tied)  # 0-based, each equally likely
                inside = ranks[ranks < k]
                total = sums.setdefault(scorer, np.zeros(2))  # (hits, NDCG) summed over users
                total += (len(inside) / tied, gains[inside].sum() / tied)
        result[split] = {scorer: {f"hit@{k}": float(h / users), f"ndcg@{k}": float(n / users)}
                         for scorer, (h, n) in sums.items()}
    return result
