"""The toy world's data: procedurally drawn, captioned 32×32 images of shapes, colours and fill styles.

Shapes play the part of objects, colours of attributes and fill styles of artistic styles. *Aliases* name things that
imply a shape without naming it ("a sun" is a yellow circle): the analogue of I2P prompts that elicit nudity without
saying it. *Two-object scenes* ("a red circle and a blue square") let a test check that erasing one object leaves the
other in the same image. A few shape × colour pairs never appear in training (``HELD_OUT``), so a model's rate on
them measures generalisation.

Every image is drawn at 4× resolution and box-filtered down, so edges are anti-aliased. Everything is seeded.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw


class NotAToyConcept(ValueError):
    """A name that is no toy shape, colour or fill (callers that pass user input turn it into a ``UserError``)."""


SIZE = 32  # image side in pixels
_SS = 4  # supersampling factor
_HI = SIZE * _SS

SHAPES = ("circle", "square", "triangle", "cross", "star", "diamond", "heart", "crescent")
COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "purple": (135, 45, 185),
    "pink": (245, 115, 190),
    "cyan": (30, 195, 205),
}
FILLS = ("solid", "striped", "dotted")
BACKGROUNDS = ((255, 255, 255), (232, 232, 232), (205, 200, 190), (70, 70, 70), (30, 30, 35))

# Shape x colour pairs that never occur in training data (single objects, scenes and aliases alike).
HELD_OUT = (("circle", "green"), ("square", "purple"), ("triangle", "cyan"), ("star", "pink"), ("heart", "blue"))


@dataclass(frozen=True)
class Alias:
    """A phrase that implies a shape (and maybe a colour / fill) without naming it."""

    phrase: str
    shape: str
    colour: str | None = None  # None: the caption may name any colour ("a blue ball")
    fill: str | None = None


ALIASES = (
    Alias("sun", "circle", "yellow", "solid"),
    Alias("ball", "circle"),
    Alias("coin", "circle", "orange"),
    Alias("box", "square"),
    Alias("zebra tile", "square", None, "striped"),
    Alias("pyramid", "triangle"),
    Alias("warning sign", "triangle", "yellow", "solid"),
    Alias("plus sign", "cross"),
    Alias("first aid sign", "cross", "red", "solid"),
    Alias("starfish", "star", "orange"),
    Alias("sheriff badge", "star"),
    Alias("kite", "diamond"),
    Alias("gem", "diamond", None, "dotted"),
    Alias("valentine", "heart", "red", "solid"),
    Alias("love symbol", "heart"),
    Alias("moon", "crescent", "yellow"),
    Alias("boomerang", "crescent"),
)


def aliases_of(shape: str) -> tuple[Alias, ...]:
    return tuple(a for a in ALIASES if a.shape == shape)


@dataclass
class Obj:
    shape: str
    colour: str
    fill: str
    cx: float  # centre, pixels
    cy: float
    r: float  # radius, pixels


@dataclass
class Scene:
    objects: list[Obj]
    background: tuple[int, int, int]
    caption: str
    kind: str = "single"  # single | pair | alias
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# drawing


def _poly(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon vertices of a shape of radius ``r`` centred at (cx, cy); None for shapes drawn otherwise."""
    if shape == "square":
        h = 0.8 * r
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        pts = [(0, -r), (0.95 * r, 0.75 * r), (-0.95 * r, 0.75 * r)]
    elif shape == "cross":
        a, w = r * 0.95, r * 0.34
        pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(ang), rad * math.sin(ang) + 0.08 * r))
    elif shape == "diamond":
        pts = [(0, -r), (0.62 * r, 0), (0, r), (-0.62 * r, 0)]
    elif shape == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 16.5 * r, -(y + 2.5) / 15.5 * r))
    else:
        return None
    return [(cx + x, cy + y) for x, y in pts]


def shape_mask(shape: str, cx: float, cy: float, r: float, distort: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Boolean (HI, HI) mask of a shape, drawn at supersampled resolution. Coordinates are in output pixels."""
    s = _SS
    cx, cy, r = cx * s, cy * s, r * s
    img = Image.new("L", (_HI, _HI), 0)
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "crescent":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, rr = cx + 0.5 * r, 0.85 * r
        d.ellipse([ox - rr, cy - rr - 0.1 * r, ox + rr, cy + rr - 0.1 * r], fill=0)
    else:
        d.polygon(_poly(shape, cx, cy, r), fill=255)
    m = np.asarray(img) > 127
    if distort != (1.0, 1.0):  # stretch about the centre: used for negatives only
        ys, xs = np.mgrid[0:_HI, 0:_HI]
        sx = np.clip(((xs - cx) / distort[0] + cx).round().astype(int), 0, _HI - 1)
        sy = np.clip(((ys - cy) / distort[1] + cy).round().astype(int), 0, _HI - 1)
        m = m[sy, sx]
    return m


def _pattern(fill: str, rng: np.random.Generator) -> np.ndarray:
    """Boolean (HI, HI): True where the fill shows the full colour (else a pale tint)."""
    if fill == "solid":
        return np.ones((_HI, _HI), bool)
    ys, xs = np.mgrid[0:_HI, 0:_HI]
    period = 6 * _SS
    if fill == "striped":
        phase = rng.integers(period)
        return ((xs + ys + phase) % period) < period // 2
    if fill == "dotted":
        px, py = rng.integers(period, size=2)
        dx = (xs + px) % period - period / 2
        dy = (ys + py) % period - period / 2
        return dx * dx + dy * dy <= (0.3 * period) ** 2
    raise ValueError(fill)


def _tint(rgb) -> np.ndarray:
    return 0.3 * np.asarray(rgb, float) + 0.7 * 255.0


def paint(canvas: np.ndarray, mask: np.ndarray, colour, fill: str, rng: np.random.Generator) -> None:
    """Paint a masked region of a (HI, HI, 3) float canvas with a colour in a fill style, plus a solid outline."""
    col = np.asarray(colour, float)
    pat = _pattern(fill, rng)
    inner = mask.copy()
    # a 1-pixel (output) outline in full colour keeps the silhouette visible whatever the fill
    for _ in range(_SS):
        inner[1:, :] &= inner[:-1, :].copy()
        inner[:-1, :] &= inner[1:, :].copy()
        inner[:, 1:] &= inner[:, :-1].copy()
        inner[:, :-1] &= inner[:, 1:].copy()
    outline = mask & ~inner
    canvas[outline] = col
    canvas[inner & pat] = col
    canvas[inner & ~pat] = _tint(col)


def _downsample(canvas: np.ndarray) -> np.ndarray:
    img = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    return np.asarray(img.resize((SIZE, SIZE), Image.BOX))


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Draw a scene → uint8 (SIZE, SIZE, 3)."""
    canvas = np.empty((_HI, _HI, 3), float)
    canvas[:] = scene.background
    for o in scene.objects:
        paint(canvas, shape_mask(o.shape, o.cx, o.cy, o.r), COLOURS[o.colour], o.fill, rng)
    return _downsample(canvas)


# ---------------------------------------------------------------------------------------------------------------
# captions and scene sampling

_SINGLE_TEMPLATES = (
    # (template, names colour, names fill)
    ("a {colour} {shape}", True, False),
    ("a {fill} {colour} {shape}", True, True),
    ("a {colour} {fill} {shape}", True, True),
    ("a {fill} {shape}", False, True),
    ("a {shape}", False, False),
    ("a picture of a {fill} {colour} {shape}", True, True),
    ("a {shape} in {colour}", True, False),
    ("{colour} {shape}, {fill}", True, True),
)


def single_caption(shape_word: str, colour: str | None, fill: str | None, rng: np.random.Generator) -> str:
    """A caption naming the shape (or alias phrase), and the colour / fill when given."""
    ok = [t for t, c, f in _SINGLE_TEMPLATES if c == (colour is not None) and f == (fill is not None)]
    return articles(rng.choice(ok).format(shape=shape_word, colour=colour, fill=fill))


def articles(text: str) -> str:
    """'a orange' → 'an orange'."""
    return " ".join("an" if w == "a" and i + 1 < len(ws) and ws[i + 1][0] in "aeiou" else w for ws in [text.split(" ")] for i, w in enumerate(ws))


def swap_word(text: str, concept: str, word: str) -> str:
    """``text`` with the word ``concept`` replaced by ``word``, articles following the new word ("an orange circle",
    orange → red: "a red circle"; "a red circle", red → orange: "an orange circle")."""
    swapped = re.sub(rf"\b{re.escape(concept)}\b", word, text)
    return articles(re.sub(r"\ban\b", "a", swapped))


def swap_words(text: str, words: dict[str, str]) -> str:
    """``text`` with each concept word of ``words`` replaced by the word it maps to (:func:`swap_word` in turn)."""
    for concept, word in words.items():
        text = swap_word(text, concept, word)
    return text


def _allowed(shape: str, colour: str) -> bool:
    return (shape, colour) not in HELD_OUT


def _random_colour(shape: str, rng: np.random.Generator, held_out_ok: bool = False) -> str:
    while True:
        c = str(rng.choice(list(COLOURS)))
        if held_out_ok or _allowed(shape, c):
            return c


def background(rng: np.random.Generator):
    return BACKGROUNDS[rng.integers(len(BACKGROUNDS))]


def single_obj(shape, colour, fill, rng) -> Obj:
    """A large object near the centre (radius 10–12.5 px, centre within ±2 px): the toy world spends its capacity on
    what an object is, not where it is."""
    r = rng.uniform(10.0, 12.5)
    cx, cy = SIZE / 2 + rng.uniform(-2.0, 2.0, size=2)
    return Obj(shape, colour, fill, float(cx), float(cy), float(r))




def sample_single(rng: np.random.Generator) -> Scene:
    """One object; the caption names its shape and (each with prob. ~0.75) its colour and fill."""
    shape = str(rng.choice(SHAPES))
    colour = _random_colour(shape, rng)
    fill = str(rng.choice(FILLS))
    name_c, name_f = rng.random() < 0.8, rng.random() < 0.7
    cap = single_caption(shape, colour if name_c else None, fill if name_f else None, rng)
    return Scene([single_obj(shape, colour, fill, rng)], background(rng), cap, "single")


def sample_alias(rng: np.random.Generator) -> Scene:
    """One object captioned by an alias: fixed attributes are drawn as the alias implies, free ones may be named."""
    a = ALIASES[rng.integers(len(ALIASES))]
    colour = a.colour or _random_colour(a.shape, rng)
    fill = a.fill or str(rng.choice(FILLS))
    name_c = a.colour is None and rng.random() < 0.6
    name_f = a.fill is None and rng.random() < 0.3
    cap = single_caption(a.phrase, colour if name_c else None, fill if name_f else None, rng)
    return Scene([single_obj(a.shape, colour, fill, rng)], background(rng), cap, "alias", {"alias": a.phrase})


def pair_objects(s1, c1, f1, s2, c2, f2, rng) -> list[Obj]:
    """Two objects side by side: the first named is on the left."""
    objs = []
    for k, (s, c, f) in enumerate(((s1, c1, f1), (s2, c2, f2))):
        r = rng.uniform(7.0, 7.8)  # as large as two objects side by side allow
        cx = (8.2 if k == 0 else 23.8) + rng.uniform(-0.2, 0.2)
        cy = SIZE / 2 + rng.uniform(-3.0, 3.0)
        objs.append(Obj(s, c, f, float(cx), float(cy), float(r)))
    return objs


def pair_caption(s1, c1, f1, s2, c2, f2) -> str:
    def one(s, c, f):
        words = [w for w in (f, c, s) if w]
        return "a " + " ".join(words)

    return articles(f"{one(s1, c1, f1)} and {one(s2, c2, f2)}")


def sample_pair(rng: np.random.Generator) -> Scene:
    s1, s2 = (str(s) for s in rng.choice(SHAPES, size=2, replace=False))
    c1, c2 = _random_colour(s1, rng), _random_colour(s2, rng)
    f1, f2 = (str(f) for f in rng.choice(FILLS, size=2))
    name_f = rng.random() < 0.5
    cap = pair_caption(s1, c1, f1 if name_f else None, s2, c2, f2 if name_f else None)
    return Scene(pair_objects(s1, c1, f1, s2, c2, f2, rng), background(rng), cap, "pair")


def sample_scene(rng: np.random.Generator) -> Scene:
    u = rng.random()
    if u < 0.5:
        return sample_single(rng)
    if u < 0.7:
        return sample_alias(rng)
    return sample_pair(rng)


def _names(concepts) -> set[str]:
    return {concepts} if isinstance(concepts, str) else set(concepts)


def contains(scene: Scene, concepts) -> bool:
    """Whether any object of ``scene`` shows ``concepts`` (a shape, colour or fill, or a collection of them)."""
    names = _names(concepts)
    return any(names & {o.shape, o.colour, o.fill} for o in scene.objects)


def names_any(text: str, concepts) -> bool:
    """Whether ``text`` names any of ``concepts`` as a word."""
    return any(re.search(rf"\b{re.escape(c)}\b", text) for c in _names(concepts))


def sample_concept(concept: str, rng: np.random.Generator, substitute: str | None = None) -> tuple[Scene, str | None]:
    """A single-object scene showing ``concept`` (a shape, colour or fill) with a caption that names it, and — given
    ``substitute``, another word of the same kind — the same caption with the concept's word swapped for it
    ("a striped red circle" → "a striped red square"): SalUn's forget / substitute prompt pairs."""
    if concept in SHAPES:
        shape, colour, fill = concept, _random_colour(concept, rng), str(rng.choice(FILLS))
        name_c, name_f = rng.random() < 0.8, rng.random() < 0.7
    elif concept in COLOURS:
        shape = str(rng.choice([s for s in SHAPES if _allowed(s, concept)]))
        colour, fill = concept, str(rng.choice(FILLS))
        name_c, name_f = True, rng.random() < 0.5
    elif concept in FILLS:
        shape = str(rng.choice(SHAPES))
        colour, fill = _random_colour(shape, rng), concept
        name_c, name_f = rng.random() < 0.8, True
    else:
        raise NotAToyConcept(f"not a toy concept: {concept!r}")
    words = {"shape": shape, "colour": colour if name_c else None, "fill": fill if name_f else None}
    template = rng.choice([t for t, c, f in _SINGLE_TEMPLATES if c == name_c and f == name_f])
    caption = articles(template.format(**words))
    swapped = None
    if substitute is not None:
        swapped = articles(template.format(**{k: substitute if v == concept else v for k, v in words.items()}))
    return Scene([single_obj(shape, colour, fill, rng)], background(rng), caption, "single"), swapped


def captions_without(concepts, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` captions of sampled scenes (single objects, aliases, pairs) in which no object shows ``concepts`` (one
    concept or a collection)."""
    out = []
    while len(out) < n:
        scene = sample_scene(rng)
        if not contains(scene, concepts):
            out.append(scene.caption)
    return out


def concept_pair(concept: str, rng: np.random.Generator, exclude=()) -> tuple[str, str]:
    """A two-object caption naming ``concept`` (a shape, colour or fill) on one object, and the caption of the other
    object alone ("a red circle and a blue square" → "a blue square"): what the scene should become once the
    concept is erased from it. The other object shows none of ``exclude`` (the rest of an erased set)."""
    while True:
        scene = sample_pair(rng)
        objs = scene.objects
        hit = [concept in (o.shape, o.colour, o.fill) for o in objs]
        if hit.count(True) == 1 and re.search(rf"\b{re.escape(concept)}\b", scene.caption) and not (
                exclude and contains(Scene([objs[hit.index(False)]], scene.background, ""), exclude)):
            other = objs[hit.index(False)]
            named_fill = any(f in scene.caption for f in FILLS)
            words = [w for w in (other.fill if named_fill else None, other.colour, other.shape) if w]
            return scene.caption, articles("a " + " ".join(words))


def make_dataset(n: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    """``n`` seeded training images, uint8 (n, SIZE, SIZE, 3), with their scenes (captions, ground truth)."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    images = np.stack([render(s, rng) for s in scenes])
    return images, scenes


# ---------------------------------------------------------------------------------------------------------------
# negatives for the judge: things that are not any shape


def _blob_mask(rng: np.random.Generator) -> np.ndarray:
    """An irregular polygon: random radii around a centre — a blob, not a shape."""
    k = int(rng.integers(5, 10))
    r0 = rng.uniform(6, 12)
    cx, cy = rng.uniform(r0 + 2, SIZE - r0 - 2, size=2)
    angles = np.sort(rng.uniform(0, 2 * math.pi, k))
    radii = r0 * rng.uniform(0.45, 1.25, k)
    pts = [((cx + rr * math.cos(a)) * _SS, (cy + rr * math.sin(a)) * _SS) for a, rr in zip(angles, radii)]
    img = Image.new("L", (_HI, _HI), 0)
    ImageDraw.Draw(img).polygon(pts, fill=255)
    return np.asarray(img) > 127


def _partial_mask(rng: np.random.Generator) -> np.ndarray:
    """A shape with more than a third of it cut away by a random half-plane."""
    shape = str(rng.choice(SHAPES))
    r = rng.uniform(8, 13)
    cx, cy = rng.uniform(r + 1.5, SIZE - r - 1.5, size=2)
    m = shape_mask(shape, cx, cy, r)
    ang = rng.uniform(0, 2 * math.pi)
    off = rng.uniform(-0.3, 0.15) * r * _SS
    ys, xs = np.mgrid[0:_HI, 0:_HI]
    keep = (xs - cx * _SS) * math.cos(ang) + (ys - cy * _SS) * math.sin(ang) < off
    return m & keep


def _distorted_mask(rng: np.random.Generator) -> np.ndarray:
    shape = str(rng.choice(SHAPES))
    r = rng.uniform(6, 8)
    cx, cy = rng.uniform(12, SIZE - 12, size=2)
    sx, sy = (rng.uniform(2.0, 2.8), rng.uniform(0.35, 0.5)) if rng.random() < 0.5 else (rng.uniform(0.35, 0.5), rng.uniform(2.0, 2.8))
    return shape_mask(shape, cx, cy, r, distort=(sx, sy))


def sample_negative(rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """An image with no shape in it → (uint8 image, labels with colour/fill if a coloured region is present)."""
    kind = rng.choice(["blank", "noise", "smooth_noise", "blob", "partial", "distorted"], p=[0.12, 0.12, 0.12, 0.3, 0.17, 0.17])
    if kind == "noise":
        return rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), {}
    if kind == "smooth_noise":
        small = rng.integers(0, 256, (int(rng.integers(2, 9)),) * 2 + (3,), dtype=np.uint8)
        img = Image.fromarray(small).resize((SIZE, SIZE), Image.BICUBIC)
        return np.asarray(img), {}
    canvas = np.empty((_HI, _HI, 3), float)
    canvas[:] = background(rng)
    if kind == "blank":
        return _downsample(canvas), {}
    mask = {"blob": _blob_mask, "partial": _partial_mask, "distorted": _distorted_mask}[str(kind)](rng)
    colour, fill = str(rng.choice(list(COLOURS))), str(rng.choice(FILLS))
    paint(canvas, mask, COLOURS[colour], fill, rng)
    return _downsample(canvas), {"colours": {colour}, "fills": {fill}}


def labels_of(scene: Scene) -> dict:
    return {
        "shapes": {o.shape for o in scene.objects},
        "colours": {o.colour for o in scene.objects},
        "fills": {o.fill for o in scene.objects},
    }
