"""Held-out retrieval report for the demo world.

Takes encode callables rather than a model so the same report measures the in-memory
model during training and the shipped, registered `demo-clip` encoder afterwards.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from mmembed.demo import world
from mmembed.encoders.base import l2_normalise

EncodeImages = Callable[[Sequence[Image.Image]], np.ndarray]
EncodeTexts = Callable[[Sequence[str]], np.ndarray]

# Queries a person would type, checked by precision@5: every top-5 scene must contain them.
SHORT_QUERIES = (
    "red circle",
    "blue square",
    "green triangle",
    "yellow star",
    "purple cross",
    "orange circle",
    "black square",
    "white star",
    "a large blue circle",
    "a small red square",
    "a green triangle at the bottom right",
    "a red circle in the top left",
    "a yellow star in the center",
    "a blue square in the bottom left",
    "a red circle and a blue square",
    "a black cross and a white triangle",
)


def parse_short_query(text: str) -> world.Query:
    """Turn one of SHORT_QUERIES back into structure (small grammar, demo world only)."""
    specs = []
    for part in text.replace(", ", " and ").split(" and "):
        words = part.split()
        position = next((p for p in world.POSITIONS if part.endswith(p)), None)
        specs.append(
            world.Spec(
                shape=next(w for w in words if w in world.SHAPES),
                colour=next((w for w in words if w in world.COLOURS), None),
                size=next((w for w in words if w in world.SIZES), None),
                position=position,
            )
        )
    return world.Query(tuple(specs), exact=False)


# Each query type's targets (issue 22): what a short query names of one or two objects.
QUERY_TYPES = ("colour+shape", "size", "position", "two objects")
TYPE_TARGETS = {"colour+shape": 0.90, "size": 0.75, "position": 0.60, "two objects": 0.60}
TYPED_POOL = 2000  # large enough that every single-object query has at least 5 relevant scenes
MAX_QUERIES_PER_TYPE = 200


def _typed_candidates(scenes: Sequence[world.Scene]) -> dict[str, set[tuple[world.Spec, ...]]]:
    found: dict[str, set[tuple[world.Spec, ...]]] = {t: set() for t in QUERY_TYPES}
    for scene in scenes:
        for o in scene.objects:
            found["colour+shape"].add((world.Spec(o.shape, o.colour),))
            found["size"].add((world.Spec(o.shape, o.colour, size=o.size),))
            found["position"].add((world.Spec(o.shape, o.colour, position=o.position),))
        for a, b in itertools.permutations(scene.objects, 2):
            if (a.shape, a.colour) < (b.shape, b.colour):
                found["two objects"].add((world.Spec(a.shape, a.colour), world.Spec(b.shape, b.colour)))
    return found


def typed_queries(scenes: Sequence[world.Scene], seed: int) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Every query of each type with at least 5 relevant scenes in the pool (up to
    MAX_QUERIES_PER_TYPE, sampled), as (text, relevance over the pool)."""
    rng = random.Random(seed)
    out: dict[str, list[tuple[str, np.ndarray]]] = {}
    for kind, specs in _typed_candidates(scenes).items():
        queries = []
        for spec in sorted(specs, key=repr):
            query = world.Query(spec, exact=False)
            relevant = np.array([query.matches(s) for s in scenes])
            if relevant.sum() >= 5:
                queries.append((world.render_query(query, rng), relevant))
        out[kind] = rng.sample(queries, min(len(queries), MAX_QUERIES_PER_TYPE))
    return out


def precision_at_5(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Per query (rows), the share of its 5 best-scored scenes that are relevant."""
    top5 = np.argsort(-scores, axis=1)[:, :5]
    return np.take_along_axis(relevant, top5, axis=1).mean(axis=1)


def typed_report(
    scenes: Sequence[world.Scene], img: np.ndarray, encode_texts: EncodeTexts, seed: int
) -> dict[str, Any]:
    """Precision@5 per query type over the whole pool, with examples of each type."""
    report: dict[str, Any] = {}
    counts: dict[str, int] = {}
    examples: dict[str, str] = {}
    for kind, queries in typed_queries(scenes, seed).items():
        if not queries:  # a pool too small for this type (a smoke-test run)
            continue
        texts = [t for t, _ in queries]
        scores = l2_normalise(encode_texts(texts)) @ img.T
        report[f"P@5 {kind}"] = float(precision_at_5(scores, np.stack([r for _, r in queries])).mean())
        counts[kind], examples[kind] = len(texts), texts[0]
    return report | {"typed_queries": counts, "typed_examples": examples}


def retrieval_report(
    encode_images: EncodeImages,
    encode_texts: EncodeTexts,
    n: int = 1000,
    seed: int = 1234,
    size: int = 64,
    typed_pool: int = TYPED_POOL,
) -> dict[str, Any]:
    """Text-to-image Recall@1/5/10 with full captions, image-to-text Recall@1, and
    precision@5 of short queries, on n held-out scenes; then precision@5 per query type
    over a pool of ``typed_pool`` held-out scenes (the first n are the same scenes).

    A retrieved scene counts as a hit when it has the same objects as the query's scene:
    identical compositions do occur in a pool of 1,000 and are indistinguishable by caption.
    """
    big = world.eval_set(max(n, typed_pool), seed=seed, size=size)
    all_img = l2_normalise(encode_images([im for _, im in big]))
    pool, img = big[:n], all_img[:n]
    scenes = [s for s, _ in pool]
    sigs = [s.signature for s in scenes]
    captions = [s.caption() for s in scenes]
    txt = l2_normalise(encode_texts(captions))
    same = np.array([[a == b for b in sigs] for a in sigs])
    sim = txt @ img.T  # rows: captions, columns: images
    order = np.argsort(-sim, axis=1)
    report: dict[str, Any] = {"n_pairs": n}
    for k in (1, 5, 10):
        hits = [same[i, order[i, :k]].any() for i in range(n)]
        report[f"text_to_image_R@{k}"] = float(np.mean(hits))
    best_text = np.argmax(sim.T, axis=1)  # for each image, the best caption
    report["image_to_text_R@1"] = float(np.mean([same[j, best_text[j]] for j in range(n)]))

    short_q = l2_normalise(encode_texts(list(SHORT_QUERIES)))
    short_relevant = np.array([[parse_short_query(q).matches(s) for s in scenes] for q in SHORT_QUERIES])
    precisions = precision_at_5(short_q @ img.T, short_relevant)
    report["short_query_P@5"] = float(np.mean(precisions))
    report["short_query_P@5_by_query"] = {q: float(p) for q, p in zip(SHORT_QUERIES, precisions, strict=True)}
    report |= typed_report([s for s, _ in big], all_img, encode_texts, seed)
    rng = random.Random(seed)
    report["random_R@5"] = float(np.mean([same[i, rng.sample(range(n), 5)].any() for i in range(n)]))
    return report


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER: word edits (substitutions, insertions, deletions) over reference words,
    after Whisper's English normaliser (case, punctuation, spelled numbers)."""
    from whisper.normalizers import EnglishTextNormalizer

    normalise = EnglishTextNormalizer()
    edits = words = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        r, h = normalise(ref).split(), normalise(hyp).split()
        row = list(range(len(h) + 1))
        for i, rw in enumerate(r, 1):
            prev, row[0] = row[0], i
            for j, hw in enumerate(h, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rw != hw))
        edits, words = edits + row[-1], words + len(r)
    return edits / max(words, 1)
