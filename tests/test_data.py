"""The toy world's data: rich, seeded, with aliases, pairs, held-out combinations and negatives."""

import numpy as np

from erasure.toyworld import data


def test_world_is_rich_enough():
    assert len(data.SHAPES) >= 8 and len(data.COLOURS) >= 8 and len(data.FILLS) >= 3
    assert all(data.aliases_of(s) for s in data.SHAPES), "every shape has at least one alias"
    sun = next(a for a in data.ALIASES if a.phrase == "sun")
    assert (sun.shape, sun.colour) == ("circle", "yellow")


def test_dataset_is_seeded_and_varied():
    a, sa = data.make_dataset(200, seed=3)
    b, sb = data.make_dataset(200, seed=3)
    c, _ = data.make_dataset(200, seed=4)
    assert a.shape == (200, data.SIZE, data.SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and [s.caption for s in sa] == [s.caption for s in sb]
    assert not np.array_equal(a, c)
    kinds = {s.kind for s in sa}
    assert kinds == {"single", "alias", "pair"}
    assert len({s.caption for s in sa}) > 100, "captions vary"


def test_held_out_pairs_never_in_training_data():
    _, scenes = data.make_dataset(3000, seed=0)
    seen = {(o.shape, o.colour) for s in scenes for o in s.objects}
    for pair in data.HELD_OUT:
        assert pair not in seen
    assert len(seen) == len(data.SHAPES) * len(data.COLOURS) - len(data.HELD_OUT)


def test_captions_name_what_is_drawn():
    rng = np.random.default_rng(0)
    for _ in range(300):
        s = data.sample_scene(rng)
        if s.kind == "pair":
            left, right = sorted(s.objects, key=lambda o: o.cx)
            first, second = s.caption.split(" and ")
            assert first.endswith(left.shape) and second.endswith(right.shape)
        elif s.kind == "single":
            assert s.objects[0].shape in s.caption
        else:
            assert s.meta["alias"] in s.caption and s.objects[0].shape not in s.caption.split()  # "starfish" is one token
    assert data.articles("a orange circle and a red star") == "an orange circle and a red star"


def test_fills_differ_visibly():
    rng = np.random.default_rng(0)
    imgs = {f: data.render(data.Scene([data.Obj("square", "red", f, 16, 16, 12)], (255, 255, 255), ""), rng)
            for f in data.FILLS}
    centre = {f: im[8:24, 8:24].astype(float) for f, im in imgs.items()}
    spread = {f: c.std(axis=(0, 1)).max() for f, c in centre.items()}  # per channel
    assert spread["solid"] < 5  # a uniform patch
    assert spread["striped"] > 20 and spread["dotted"] > 20
    assert np.abs(centre["striped"] - centre["dotted"]).mean() > 10


def test_negatives_have_no_shape_labels():
    rng = np.random.default_rng(0)
    for _ in range(50):
        img, labels = data.sample_negative(rng)
        assert img.shape == (data.SIZE, data.SIZE, 3) and img.dtype == np.uint8
        assert not labels.get("shapes")
