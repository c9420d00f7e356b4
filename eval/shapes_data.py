"""Procedural caption -> image data with known ground truth: coloured shapes on plain backgrounds.

Every sample is a `Scene` (one or two objects, each a shape, colour, 3x3 grid cell and size, on a background
colour) rendered to a 64x64 RGB image and described by a caption in varied wording. Everything is
deterministic from a seed, and the sampler is unlimited. A fixed set of (colour, shape, cell) triples is
held out: the training sampler never draws an object with one of them, and the evaluation prompts
(`heldout_prompts`) are built from them, so the evaluation asks for combinations the model never saw.

Colours are saturated and backgrounds are neutral, so an object is found by its chroma alone; that is what
lets `eval/adherence.py` read the attributes back by rules.
"""
import hashlib
import random
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down: smooth, anti-aliased edges

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = {  # saturated: chroma (max - min channel) >= 110
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (235, 215, 30), "green": (40, 170, 60),
    "cyan": (30, 200, 215), "blue": (40, 70, 220), "purple": (140, 50, 200), "pink": (245, 110, 185),
}
BACKGROUNDS = {  # neutral: chroma <= 45
    "white": (245, 245, 245), "light grey": (190, 190, 190), "grey": (120, 120, 120),
    "black": (20, 20, 20), "beige": (225, 210, 180),
}
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
# Radius in pixels of a 64x64 image, and the centres of the 3x3 grid's rows / columns. Objects sit exactly on
# the grid: large enough that their outline spans several latent pixels (at radius 7 / 10 with jitter, two
# training runs never learned shape), and apart enough that two small ones in neighbouring cells never touch.
SIZES = {"small": 9.0, "large": 13.0}
CENTRES = (13.0, 32.0, 51.0)

# A (colour, shape, cell) triple is held out when its hash falls in this residue class: 1 in 8 of the 432.
HELDOUT_MODULUS = 8


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    row: int  # 0 top .. 2 bottom
    col: int  # 0 left .. 2 right
    size: str  # "small" | "large"

    @property
    def centre(self):
        return CENTRES[self.col], CENTRES[self.row]


def cell_index(v):
    """Row or column (0, 1, 2) of a coordinate in pixels: the nearest grid centre."""
    return int(np.argmin([abs(v - c) for c in CENTRES]))


@dataclass(frozen=True)
class Scene:
    objects: Tuple[Obj, ...]
    background: str
    caption: str = ""
    # what the caption asks for (the adherence reader scores exactly these)
    mentions_background: bool = False
    relation: Optional[str] = None  # two objects: "left of" | "right of" | "above" | "below" | None
    mentions: Tuple[Tuple[str, ...], ...] = field(default_factory=tuple)  # per object: attributes named


def is_heldout(colour, shape, row, col):
    key = f"{colour}|{shape}|{row}|{col}".encode()
    return int(hashlib.sha256(key).hexdigest(), 16) % HELDOUT_MODULUS == 0


def heldout_triples():
    return [(c, s, r, k) for c in COLOURS for s in SHAPES for r in range(3) for k in range(3) if is_heldout(c, s, r, k)]


# ---------------------------------------------------------------- rendering

def shape_polygon(shape, cx, cy, r):
    """Outline of a shape of radius r centred at (cx, cy): a list of (x, y) points, or None for the circle."""
    if shape == "square":
        a = 0.85 * r
        return [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.42 * r
            ang = -np.pi / 2 + i * np.pi / 5
            pts.append((cx + rad * np.cos(ang), cy + rad * np.sin(ang)))
        return pts
    if shape == "cross":
        a, w = r, 0.33 * r
        return [(cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w), (cx + a, cy + w),
                (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a), (cx - w, cy + w), (cx - a, cy + w),
                (cx - a, cy - w), (cx - w, cy - w)]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}")


def coverage(shape, cx, cy, r, size=IMAGE_SIZE):
    """Anti-aliased coverage in [0, 1], [size, size] float32, of one shape."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    poly = shape_polygon(shape, cx * s, cy * s, r * s)
    if poly is None:
        draw.ellipse([cx * s - r * s, cy * s - r * s, cx * s + r * s, cy * s + r * s], fill=255)
    else:
        draw.polygon(poly, fill=255)
    return np.asarray(canvas.resize((size, size), Image.BOX), np.float32) / 255.0


def render(scene):
    """Scene -> uint8 image [64, 64, 3]."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    img[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        cx, cy = obj.centre
        a = coverage(obj.shape, cx, cy, SIZES[obj.size])[..., None]
        img = img * (1 - a) + np.asarray(COLOURS[obj.colour], np.float32) * a
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- captions

_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
_CELL_PHRASES = {
    (0, 0): ("in the top left corner", "in the upper left", "at the top left"),
    (0, 1): ("at the top", "in the top middle", "at the top center"),
    (0, 2): ("in the top right corner", "in the upper right", "at the top right"),
    (1, 0): ("on the left", "in the middle left", "at the left side"),
    (1, 1): ("in the center", "in the middle", "at the center"),
    (1, 2): ("on the right", "in the middle right", "at the right side"),
    (2, 0): ("in the bottom left corner", "in the lower left", "at the bottom left"),
    (2, 1): ("at the bottom", "in the bottom middle", "at the bottom center"),
    (2, 2): ("in the bottom right corner", "in the lower right", "at the bottom right"),
}
_RELATIONS = {"left of": ("to the left of", "left of"), "right of": ("to the right of", "right of"),
              "above": ("above", "over"), "below": ("below", "under")}


def _a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def _bg_phrase(rng, bg):
    return rng.choice((f"on a {bg} background", f"against a {bg} background", f"with a {bg} background"))


def caption_one(rng, obj, bg, with_bg):
    noun = f"{rng.choice(_SIZE_WORDS[obj.size])} {obj.colour} {obj.shape}"
    where = rng.choice(_CELL_PHRASES[(obj.row, obj.col)])
    form = rng.randrange(4)
    if form == 0:
        text = f"{_a(noun)} {where}"
    elif form == 1:
        text = f"there is {_a(noun)} {where}"
    elif form == 2:
        text = f"{where}, {_a(noun)}"
    else:
        text = f"a picture of {_a(noun)} {where}"
    return f"{text} {_bg_phrase(rng, bg)}" if with_bg else text


def caption_two(rng, a, b, relation, bg, with_bg):
    first, second = f"{a.colour} {a.shape}", f"{b.colour} {b.shape}"
    if relation is None:
        wa, wb = rng.choice(_CELL_PHRASES[(a.row, a.col)]), rng.choice(_CELL_PHRASES[(b.row, b.col)])
        text = f"{_a(first)} {wa} and {_a(second)} {wb}"
    else:
        text = f"{_a(first)} {rng.choice(_RELATIONS[relation])} {_a(second)}"
    return f"{text} {_bg_phrase(rng, bg)}" if with_bg else text


# ---------------------------------------------------------------- sampling

def _background(rng):
    return rng.choice(tuple(BACKGROUNDS))


def _shape(rng, shape_weights):
    """A shape, uniform unless weights (shape -> relative weight, 1 for a shape not named) are given."""
    if not shape_weights:
        return rng.choice(SHAPES)
    return rng.choices(SHAPES, weights=[shape_weights.get(s, 1.0) for s in SHAPES])[0]


def sample_one(rng, heldout, shape_weights=None):
    """One object; heldout=False never draws a held-out triple, heldout=True only draws those."""
    if heldout:
        colour, shape, row, col = rng.choice(heldout_triples())
    else:
        while True:
            colour, shape = rng.choice(tuple(COLOURS)), _shape(rng, shape_weights)
            row, col = rng.randrange(3), rng.randrange(3)
            if not is_heldout(colour, shape, row, col):
                break
    obj = Obj(shape, colour, row, col, rng.choice(tuple(SIZES)))
    bg, with_bg = _background(rng), rng.random() < 0.5
    return Scene((obj,), bg, caption_one(rng, obj, bg, with_bg), with_bg, None,
                 (("colour", "shape", "position", "size"),))


def sample_two(rng, heldout, shape_weights=None):
    """Two objects of different colours in different cells, described by a relation or by both cells.
    heldout=False: neither object is a held-out triple; heldout=True: the first object is one."""
    while True:
        relation = rng.choice(("left of", "right of", "above", "below", None))
        if relation in ("left of", "right of"):
            row = rng.randrange(3)
            c1, c2 = rng.sample(range(3), 2)
            if (c1 < c2) != (relation == "left of"):
                c1, c2 = c2, c1
            cells = ((row, c1), (row, c2))
        elif relation in ("above", "below"):
            col = rng.randrange(3)
            r1, r2 = rng.sample(range(3), 2)
            if (r1 < r2) != (relation == "above"):
                r1, r2 = r2, r1
            cells = ((r1, col), (r2, col))
        else:
            first = rng.randrange(9)
            cells = tuple(divmod(k, 3) for k in (first, rng.choice([k for k in range(9) if k != first])))
        colours = rng.sample(tuple(COLOURS), 2)
        shapes = (_shape(rng, shape_weights), _shape(rng, shape_weights))
        held = [is_heldout(c, s, *cell) for c, s, cell in zip(colours, shapes, cells)]
        if (heldout and held[0]) or (not heldout and not any(held)):
            break
    # side by side, the two shapes share one size class so "left of" is not confounded by size; in
    # neighbouring cells (diagonals included) only small ones fit without touching
    neighbours = max(abs(cells[0][0] - cells[1][0]), abs(cells[0][1] - cells[1][1])) == 1
    size = "small" if neighbours else rng.choice(tuple(SIZES))
    a, b = (Obj(s, c, r, k, size) for c, s, (r, k) in zip(colours, shapes, cells))
    bg, with_bg = _background(rng), rng.random() < 0.5
    attrs = ("colour", "shape") if relation else ("colour", "shape", "position")
    return Scene((a, b), bg, caption_two(rng, a, b, relation, bg, with_bg), with_bg, relation, (attrs, attrs))


def training_sample(seed, two_object_fraction=0.3, shape_weights=None):
    """Scene number `seed` of the training stream (never a held-out triple); shape_weights (shape -> relative
    weight) over-samples hard shapes."""
    rng = random.Random(f"train-{seed}")
    if rng.random() < two_object_fraction:
        return sample_two(rng, False, shape_weights)
    return sample_one(rng, False, shape_weights)


def training_batch(first, count, two_object_fraction=0.3, shape_weights=None):
    """Scenes first .. first+count-1 of the training stream: (uint8 images [N, 64, 64, 3], captions)."""
    scenes = [training_sample(first + i, two_object_fraction, shape_weights) for i in range(count)]
    return np.stack([render(s) for s in scenes]), [s.caption for s in scenes]


def heldout_prompts(n_one=500, n_two=200):
    """The fixed evaluation set: n_one one-object and n_two two-object scenes built on held-out triples.
    Each scene's caption is its prompt; its index in the list is its identity (seeds derive from it)."""
    one, two = random.Random("heldout-one"), random.Random("heldout-two")  # a shorter list is a prefix
    return [sample_one(one, True) for _ in range(n_one)] + [sample_two(two, True) for _ in range(n_two)]


def tokenizer_corpus(n=20000):
    """Text for training the T5 SentencePiece model: captions in every wording, then each of their words
    alone (without the single words, the unigram trainer splits most words of this small vocabulary)."""
    rng = random.Random("corpus")
    captions = [(sample_two if rng.random() < 0.3 else sample_one)(rng, rng.random() < 0.1).caption
                for _ in range(n)]
    return captions + [w for c in captions[:n // 10] for w in c.replace(",", "").split()]
