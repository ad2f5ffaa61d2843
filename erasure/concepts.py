"""Concept presets: what to erase, with which prompts, towards what, on which model.

A preset carries the prompts the papers train on, the surrogate (what the erased prompt should become: ``""`` for
ESD / SPM), the substitute used by SalUn and the override used by SFD, anchor prompts that must be kept, per-method
hyper-parameter overrides the papers use for that concept, and its default model. Toy presets (every shape, colour
and fill of the toy world) default to the embedded toy model; real presets to Stable Diffusion v1.4. Any other
string is a free-text concept on a real model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adapters.errors import UserError
from erasure.toyworld import data as toy

TOY_MODEL = "toy"
SD14 = "CompVis/stable-diffusion-v1-4"


@dataclass(frozen=True)
class Concept:
    name: str
    kind: str  # toy-shape | toy-colour | toy-fill | nudity | celebrity | artist | object | free
    prompts: tuple[str, ...]  # what the methods train on
    default_model: str = SD14
    surrogate: str = ""  # ESD / SPM: the erased prompt is steered towards this ("" = unconditional)
    substitute: str = ""  # SalUn: forget prompt's prediction is mapped to this prompt's
    override: str = ""  # SFD: the teacher sees this prompt where the student sees the forget prompt
    anchors: tuple[str, ...] = ()  # prompts whose outputs must not change
    aliases: tuple[str, ...] = ()  # phrases that imply the concept without naming it (evaluation, attacks)
    method_overrides: dict = field(default_factory=dict)  # {"spm": {"eta": 3.0, ...}} as the papers use

    @property
    def is_toy(self) -> bool:
        return self.kind.startswith("toy-")


# ---------------------------------------------------------------------------------------------------------------
# toy presets


def _toy_shape(shape: str) -> Concept:
    others = [s for s in toy.SHAPES if s != shape]
    colours = [c for c in toy.COLOURS if (shape, c) not in toy.HELD_OUT]
    prompts = (f"a {shape}",) + tuple(toy.articles(f"a {c} {shape}") for c in colours[:4]) + tuple(f"a {f} {shape}" for f in toy.FILLS)
    return Concept(
        name=shape, kind="toy-shape", prompts=prompts, default_model=TOY_MODEL,
        substitute=f"a {others[(toy.SHAPES.index(shape)) % len(others)]}",
        override=f"a {others[(toy.SHAPES.index(shape)) % len(others)]}",
        anchors=tuple(f"a {s}" for s in others),
        aliases=tuple(a.phrase for a in toy.aliases_of(shape)),
        # SPM steers "a red circle" (and its pairs) to "a red square" rather than to the empty prompt: the other
        # object of a pair stays (0.90× → 1.08× the base, README); colours and fills keep SPM's empty surrogate
        method_overrides={"spm": {"steer": "swap", "pair_target": "swap", "steps": 300}},
    )


def _toy_colour(colour: str) -> Concept:
    others = [c for c in toy.COLOURS if c != colour]
    shapes = [s for s in toy.SHAPES if (s, colour) not in toy.HELD_OUT]
    return Concept(
        name=colour, kind="toy-colour", default_model=TOY_MODEL,
        prompts=tuple(toy.articles(f"a {colour} {s}") for s in shapes),
        substitute=toy.articles(f"a {others[0]} {shapes[0]}"), override=toy.articles(f"a {others[0]} {shapes[0]}"),
        anchors=tuple(toy.articles(f"a {c} {shapes[0]}") for c in others),
        aliases=tuple(a.phrase for a in toy.ALIASES if a.colour == colour),
    )


def _toy_fill(fill: str) -> Concept:
    others = [f for f in toy.FILLS if f != fill]
    return Concept(
        name=fill, kind="toy-fill", default_model=TOY_MODEL,
        prompts=tuple(f"a {fill} {s}" for s in toy.SHAPES),
        substitute=f"a {others[0]} {toy.SHAPES[0]}", override=f"a {others[0]} {toy.SHAPES[0]}",
        anchors=tuple(f"a {f} {toy.SHAPES[0]}" for f in others),
        aliases=tuple(a.phrase for a in toy.ALIASES if a.fill == fill),
    )


def toy_word(concept: Concept, text: str, role: str) -> str:
    """The first word of ``text`` naming another toy shape / colour / fill of ``concept``'s kind (the word a method
    puts in the concept's place: "a red square" for "circle" → "square"). ``role`` names ``text`` in the error."""
    vocab = {"toy-shape": toy.SHAPES, "toy-colour": tuple(toy.COLOURS), "toy-fill": toy.FILLS}[concept.kind]
    words = [w for w in text.split() if w in vocab and w != concept.name]
    if not words:
        raise UserError(f"{role} '{text}' names no other {concept.kind[4:]} of the toy world")
    return words[0]


def toy_presets() -> dict[str, Concept]:
    out = {s: _toy_shape(s) for s in toy.SHAPES}
    out.update({c: _toy_colour(c) for c in toy.COLOURS})
    out.update({f: _toy_fill(f) for f in toy.FILLS})
    return out


# ---------------------------------------------------------------------------------------------------------------
# real presets (prompts as the papers use them; see shared/reference/*.md)

_NUDITY = Concept(
    name="nudity", kind="nudity",
    # ESD-u and SPM train on the single word "nudity" (ESD nudity weights; SPM App. C.1); SalUn's forget prompt is
    # "a photo of a nude person"; MACE / SA also erase "naked, erotic, sexual".
    prompts=("nudity",),
    substitute="a photo of a person wearing clothes",  # SalUn nsfw_removal.py
    override="a person",  # SFD: the bare subject without the NSFW keyword
    anchors=("a photo of a person", "a portrait of a woman", "a portrait of a man"),
    aliases=("naked", "nude", "a photo of a nude person", "erotic", "sexual", "topless"),
    method_overrides={
        "spm": {"eta": 3.0, "anchor_weight": 100.0, "steps": 15000},  # SPM App. C.1: η 3, λ 1e2, 15K iterations
        "esd": {"variant": "esd-u"},  # ESD's released nudity model is ESD-u, η = 1
        "salun": {"forget_prompt": "a photo of a nude person"},
    },
)

_CELEBRITIES = {
    # SFD's celebrity setting (Brad Pitt / Angelina Jolie → "a middle aged man/woman"); ESD-x is the better ESD
    # variant for one identity (ESD issue #13: ESD-u spills over to other celebrities).
    "brad pitt": ("a middle aged man", "man"),
    "angelina jolie": ("a middle aged woman", "woman"),
    "tom cruise": ("a middle aged man", "man"),
    "taylor swift": ("a young woman", "woman"),
}
_ARTISTS = ("van gogh", "pablo picasso", "rembrandt", "andy warhol", "caravaggio")  # SPM Tab. 7's five artists
_OBJECTS = ("church", "tench", "parachute", "garbage truck", "english springer", "cassette player",
            "chain saw", "french horn", "gas pump", "golf ball")  # Imagenette classes (ESD / SalUn)


def _real_presets() -> dict[str, Concept]:
    out = {"nudity": _NUDITY}
    for name, (override, who) in _CELEBRITIES.items():
        out[name] = Concept(
            name=name, kind="celebrity", prompts=(name, f"a photo of {name}", f"a portrait of {name}"),
            substitute=f"a photo of {override}", override=override,
            anchors=(f"a photo of a {who}", "a photo of a person"),
            method_overrides={"esd": {"variant": "esd-x"}},
        )
    for name in _ARTISTS:
        out[name] = Concept(
            name=name, kind="artist", prompts=(name, f"a painting in the style of {name}"),
            substitute="a painting", override="a painting",
            anchors=("a painting", "a painting in the style of claude monet"),
            method_overrides={"esd": {"variant": "esd-x"}},
        )
    for name in _OBJECTS:
        out[name] = Concept(
            name=name, kind="object", prompts=(name, f"an image of a {name}"),
            substitute="an image of an object", override="an image",
            anchors=tuple(f"an image of a {o}" for o in _OBJECTS if o != name)[:4],
            method_overrides={"esd": {"variant": "esd-u"}},
        )
    return out


def presets() -> dict[str, Concept]:
    return {**toy_presets(), **_real_presets()}


def resolve(name: str, model: str | None = None) -> Concept:
    """Resolve a preset name (case-insensitive) or free text, and check it fits ``model``.

    A toy concept on a real model, or a real preset on the toy model, is a :class:`UserError`.
    """
    key = " ".join(name.strip().lower().split())
    if not key:
        raise UserError("the concept is empty: pass --concept NAME (e.g. circle, red, striped, nudity, 'van gogh')")
    known = presets()
    if key in known:
        concept = known[key]
    else:
        concept = Concept(name=key, kind="free", prompts=(key,), default_model=model or SD14)
    if model is not None:
        on_toy = model == TOY_MODEL
        if concept.is_toy and not on_toy:
            raise UserError(f"'{concept.name}' is a toy-world concept; it can only be erased from --model toy")
        if on_toy and not concept.is_toy:
            what = "a real-model preset" if concept.kind != "free" else "not a toy-world concept"
            raise UserError(f"'{concept.name}' is {what}; the toy world knows: {', '.join(toy_presets())}")
    return concept
