"""The demo world: Pillow-rendered scenes of 1 to 3 shapes with known captions.

No CLIP weights can be had offline, so the project trains its own small CLIP on a world
whose ground truth it knows exactly. Scenes are structured data first (``Scene``) and
pixels second (``render``), so the training loss, the evaluation and the tests can all
ask "does this caption describe this scene?" (``Query.matches``) instead of comparing
strings.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "orange": (250, 140, 20),
    "purple": (140, 40, 170),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
}
SIZES = ("small", "large")
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "center": (0.5, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
# Radius as a fraction of the image side; large shapes in neighbouring cells never touch.
RADIUS = {"small": (0.075, 0.095), "large": (0.14, 0.165)}
MAX_OBJECTS = 3
SUPERSAMPLE = 3


@dataclass(frozen=True, order=True)
class Obj:
    size: str
    colour: str
    shape: str
    position: str

    def phrase(self, preposition: str = "in the") -> str:
        return f"{article(self.size)} {self.size} {self.colour} {self.shape} {preposition} {self.position}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]

    @property
    def signature(self) -> tuple[Obj, ...]:
        """Order-free identity: two scenes with the same signature have the same caption."""
        return tuple(sorted(self.objects))

    def caption(self) -> str:
        """The canonical full caption (objects in reading order of their positions)."""
        order = list(POSITIONS)
        objs = sorted(self.objects, key=lambda o: order.index(o.position))
        return join_phrases([o.phrase() for o in objs])

    def held_out(self) -> bool:
        """A fixed tenth of multi-object compositions is never used in training."""
        if len(self.objects) < 2:
            return False
        digest = hashlib.sha256(repr(self.signature).encode()).digest()
        return digest[0] % 10 == 0


@dataclass(frozen=True)
class Spec:
    """A possibly partial description of one object; None means "not mentioned"."""

    shape: str
    colour: str | None = None
    size: str | None = None
    position: str | None = None

    def fits(self, obj: Obj) -> bool:
        return (
            obj.shape == self.shape
            and self.colour in (None, obj.colour)
            and self.size in (None, obj.size)
            and self.position in (None, obj.position)
        )

    def is_full(self) -> bool:
        return None not in (self.colour, self.size, self.position)


@dataclass(frozen=True)
class Query:
    """What a caption says. A full caption names every object (exact); a partial one
    names some objects by some attributes and matches every scene that contains them."""

    specs: tuple[Spec, ...]
    exact: bool

    def matches(self, scene: Scene) -> bool:
        if self.exact and len(scene.objects) != len(self.specs):
            return False
        if len(self.specs) > len(scene.objects):
            return False
        return any(
            all(spec.fits(obj) for spec, obj in zip(self.specs, perm, strict=False))
            for perm in itertools.permutations(scene.objects, len(self.specs))
        )


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def join_phrases(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def full_query(scene: Scene) -> Query:
    return Query(tuple(Spec(o.shape, o.colour, o.size, o.position) for o in scene.objects), exact=True)


def random_object(rng: random.Random, position: str) -> Obj:
    return Obj(rng.choice(SIZES), rng.choice(list(COLOURS)), rng.choice(SHAPES), position)


def random_scene(rng: random.Random, n_objects: int | None = None) -> Scene:
    n = n_objects or rng.randint(1, MAX_OBJECTS)
    positions = rng.sample(list(POSITIONS), n)
    return Scene(tuple(random_object(rng, p) for p in positions))


def sample_scene(rng: random.Random, held_out: bool) -> Scene:
    """A training scene (held_out=False) or an evaluation scene (held_out=True), with 1, 2
    or 3 objects equally likely. Evaluation's multi-object scenes are compositions training
    never sees; its single-object scenes are fresh renders (all 400 single-object
    compositions are needed in training for short queries to work)."""
    n = rng.randint(1, MAX_OBJECTS)
    while True:
        scene = random_scene(rng, n)
        if scene.held_out() == held_out or (held_out and n == 1):
            return scene


def _changed(objs: list[Obj], i: int, kind: str, rng: random.Random) -> list[Obj]:
    """The objects with object i's colour, shape, size or position changed, or it removed."""
    objs, o = list(objs), objs[i]
    free = [p for p in POSITIONS if p not in {x.position for x in objs}]
    if kind == "remove":
        objs.pop(i)
    elif kind == "colour":
        objs[i] = Obj(o.size, rng.choice([c for c in COLOURS if c != o.colour]), o.shape, o.position)
    elif kind == "shape":
        objs[i] = Obj(o.size, o.colour, rng.choice([s for s in SHAPES if s != o.shape]), o.position)
    elif kind == "size":
        objs[i] = Obj("small" if o.size == "large" else "large", o.colour, o.shape, o.position)
    elif free:  # position: to a free cell
        objs[i] = Obj(o.size, o.colour, o.shape, rng.choice(free))
    else:  # position, no free cell: swap places with another object
        j = rng.choice([k for k in range(len(objs)) if k != i])
        objs[i], objs[j] = (
            Obj(o.size, o.colour, o.shape, objs[j].position),
            Obj(objs[j].size, objs[j].colour, objs[j].shape, o.position),
        )
    return objs


def perturb(scene: Scene, rng: random.Random) -> Scene:
    """A near-duplicate scene with one thing changed: the hard negative CLIP must learn."""
    objs = list(scene.objects)
    i = rng.randrange(len(objs))
    kind = rng.choice(["colour", "shape", "size", "position", "position", "count"])
    if kind == "count" and len(objs) < MAX_OBJECTS and (len(objs) == 1 or rng.random() < 0.5):
        free = [p for p in POSITIONS if p not in {x.position for x in objs}]
        objs.append(random_object(rng, rng.choice(free)))
    else:
        objs = _changed(objs, i, "remove" if kind == "count" else kind, rng)
    new = Scene(tuple(objs))
    return new if new.signature != scene.signature else perturb(scene, rng)


def training_twin(scene: Scene, rng: random.Random) -> Scene:
    """A near-duplicate whose composition training may use."""
    twin = perturb(scene, rng)
    while twin.held_out():
        twin = perturb(scene, rng)
    return twin


def _fitted_object(scene: Scene, query: Query, rng: random.Random) -> tuple[Spec, int]:
    """One of the query's specs and the index of an object in the scene that it fits."""
    spec = rng.choice(query.specs)
    return spec, rng.choice([i for i, o in enumerate(scene.objects) if spec.fits(o)])


def breaking_twin(scene: Scene, query: Query, rng: random.Random, tries: int = 20) -> Scene:
    """A scene that differs from ``scene`` (which the query matches) in one attribute the
    query names, so that it no longer matches: "a red circle in the top left" gets the red
    circle moved, or turned blue, or made a square. The negative a short query must learn."""
    for _ in range(tries):
        spec, i = _fitted_object(scene, query, rng)
        named = ["shape"] + (["colour"] if spec.colour else []) + (["position"] * 2 if spec.position else [])
        named += ["size"] if spec.size else []
        several = len(query.specs) > 1 and len(scene.objects) > 1
        objs = _changed(list(scene.objects), i, "remove" if several and rng.random() < 0.25 else rng.choice(named), rng)
        twin = Scene(tuple(objs))
        if not query.matches(twin) and not twin.held_out():
            return twin
    return training_twin(scene, rng)  # e.g. "a circle" in a scene of two circles: no one change breaks it


def keeping_twin(scene: Scene, query: Query, rng: random.Random, tries: int = 10) -> Scene:
    """A different scene the query still matches (it changes what the query does not name),
    so a short query learns to ignore the rest of the scene. A full caption has none: then
    any near-duplicate."""
    for _ in range(tries):
        twin = perturb(scene, rng)
        if query.matches(twin) and not twin.held_out():
            return twin
    return training_twin(scene, rng)


# --- captions -----------------------------------------------------------------------

_PREPOSITIONS = ("in the", "at the")


def _spec_phrase(spec: Spec, rng: random.Random, with_article: bool) -> str:
    words = [w for w in (spec.size, spec.colour, spec.shape) if w]
    text = " ".join(words)
    if with_article:
        text = f"{article(words[0])} {text}"
    if spec.position:
        text += f" {rng.choice(_PREPOSITIONS)} {spec.position}"
    return text


def render_query(query: Query, rng: random.Random) -> str:
    use_article = rng.random() < 0.8 or len(query.specs) > 1
    specs = list(query.specs)
    rng.shuffle(specs)
    return join_phrases([_spec_phrase(s, rng, use_article) for s in specs])


# What a short query names of each object, drawn uniformly from the list: repeats weigh a form up.
QUERY_FORMS = ("shape", "colour", "colour", "colour+position", "colour+size", "all-but-size")
# More queries that name where an object is: a fine-tune towards what the first training left weak.
POSITION_FORMS = (
    "shape",
    "colour",
    "colour+position",
    "colour+position",
    "colour+size",
    "all-but-size",
    "all-but-size",
)


def partial_query(scene: Scene, rng: random.Random, forms: Sequence[str] = QUERY_FORMS) -> Query:
    """A short query a person would type. It always leaves out something (size or
    position), so the same string never doubles as a full caption with another meaning."""
    objs = list(scene.objects)
    n = 1 if len(objs) == 1 or rng.random() < 0.65 else rng.randint(2, len(objs))
    chosen = rng.sample(objs, n)
    specs = []
    for o in chosen:
        form = rng.choice(forms)
        colour = o.colour if form != "shape" else None
        position = o.position if form in ("colour+position", "all-but-size") else None
        size = o.size if form == "colour+size" else None
        specs.append(Spec(o.shape, colour, size, position))
    return Query(tuple(specs), exact=False)


def training_query(
    scene: Scene, rng: random.Random, full_fraction: float = 0.5, forms: Sequence[str] = QUERY_FORMS
) -> Query:
    return full_query(scene) if rng.random() < full_fraction else partial_query(scene, rng, forms)


# --- pixels ---------------------------------------------------------------------------


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def rot(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if shape == "square":
        d = r * 0.85
        return rot([(-d, -d), (d, -d), (d, d), (-d, d)])
    if shape == "triangle":
        return rot([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        return rot(pts)
    if shape == "cross":
        w = r * 0.33
        return rot(
            [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        )
    raise ValueError(f"not a polygon shape: {shape}")


def _background(rng: random.Random, side: int) -> Image.Image:
    """Low-saturation mid-tone backgrounds keep every named colour (black and white too)
    visible, while gradients and blotches stop the model keying on one flat canvas.
    Built at a few pixels and upscaled: rendering must keep pace with training."""
    base = np.array([rng.uniform(90, 180)] * 3) + np.array([rng.uniform(-25, 25) for _ in range(3)])
    kind = rng.random()
    small = np.ones((2, 2, 3)) * base
    if kind < 0.4:
        other = base + np.array([rng.uniform(-40, 40) for _ in range(3)])
        small[1 if rng.random() < 0.5 else slice(None), 1 if rng.random() < 0.5 else slice(None)] = other
    elif kind < 0.7:
        nprng = np.random.default_rng(rng.getrandbits(32))
        small = np.ones((6, 6, 3)) * base + nprng.normal(0, rng.uniform(5, 20), (6, 6, 3))
    tile = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8))
    return tile.resize((side, side), Image.Resampling.BILINEAR)


def render(scene: Scene, rng: random.Random, size: int = 64, augment: bool = True) -> Image.Image:
    """Draw at SUPERSAMPLE x and downsample (anti-aliasing), then degrade like real photos would."""
    side = size * SUPERSAMPLE
    img = _background(rng, side) if augment else Image.new("RGB", (side, side), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        px, py = POSITIONS[o.position]
        jitter = 0.035 if augment else 0.0
        cx = (px + rng.uniform(-jitter, jitter)) * side
        cy = (py + rng.uniform(-jitter, jitter)) * side
        lo, hi = RADIUS[o.size]
        r = (rng.uniform(lo, hi) if augment else (lo + hi) / 2) * side
        colour = tuple(int(np.clip(c + (rng.uniform(-18, 18) if augment else 0), 0, 255)) for c in COLOURS[o.colour])
        angle = rng.uniform(-0.3, 0.3) if augment else 0.0
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(_shape_points(o.shape, cx, cy, r, angle), fill=colour)
    img = img.reduce(SUPERSAMPLE)
    if not augment:
        return img
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    if rng.random() < 0.5:
        arr = np.asarray(img).astype(np.float32)
        arr = arr * rng.uniform(0.9, 1.1) + rng.uniform(-12, 12)
        arr += np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(1, 6), arr.shape)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=rng.randint(35, 95))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


def eval_set(n: int, seed: int = 1234, size: int = 64) -> list[tuple[Scene, Image.Image]]:
    """Held-out scenes: multi-object compositions from the held-out tenth, rendered
    with a seed the training never uses."""
    rng = random.Random(seed)
    return [(s, render(s, rng, size)) for s in (sample_scene(rng, held_out=True) for _ in range(n))]
