"""The demo world's ground truth: captions, matching, the held-out split, rendering."""

import random

import numpy as np

from mmembed.demo import world
from mmembed.demo.metrics import SHORT_QUERIES, parse_short_query


def _scene(*objs: tuple[str, str, str, str]) -> world.Scene:
    return world.Scene(tuple(world.Obj(*o) for o in objs))


def test_full_caption_is_canonical_and_grammatical() -> None:
    scene = _scene(("small", "orange", "star", "bottom right"), ("large", "red", "circle", "top left"))
    assert scene.caption() == "a large red circle in the top left and a small orange star in the bottom right"
    three = world.Scene((world.Obj("large", "blue", "cross", "center"), *scene.objects))
    assert three.caption() == (
        "a large red circle in the top left, a large blue cross in the center "
        "and a small orange star in the bottom right"
    )


def test_full_query_is_exact_partial_is_not() -> None:
    one = _scene(("large", "red", "circle", "top left"))
    two = _scene(("large", "red", "circle", "top left"), ("small", "blue", "square", "center"))
    assert world.full_query(one).matches(one) and not world.full_query(one).matches(two)
    red_circle = world.Query((world.Spec("circle", "red"),), exact=False)
    assert red_circle.matches(one) and red_circle.matches(two)
    assert not world.Query((world.Spec("circle", "blue"),), exact=False).matches(two)
    both = world.Query((world.Spec("square", "blue"), world.Spec("circle", "red", position="top left")), exact=False)
    assert both.matches(two) and not both.matches(one)


def test_one_object_cannot_satisfy_two_specs() -> None:
    scene = _scene(("large", "red", "circle", "top left"))
    twice = world.Query((world.Spec("circle", "red"), world.Spec("circle")), exact=False)
    assert not twice.matches(scene)


def test_partial_captions_always_match_their_scene_and_never_look_full() -> None:
    rng = random.Random(3)
    for _ in range(500):
        scene = world.random_scene(rng)
        query = world.partial_query(scene, rng)
        assert query.matches(scene)
        assert not any(spec.is_full() for spec in query.specs)
        assert world.render_query(query, rng)


def test_perturbed_twin_differs_and_training_never_sees_held_out_compositions() -> None:
    rng = random.Random(5)
    for _ in range(300):
        scene = world.sample_scene(rng, held_out=False)
        assert not scene.held_out()
        twin = world.perturb(scene, rng)
        assert twin.signature != scene.signature
        assert len({o.position for o in twin.objects}) == len(twin.objects)
    held = [world.sample_scene(rng, held_out=True) for _ in range(200)]
    assert all(s.held_out() or len(s.objects) == 1 for s in held)
    assert 110 < sum(len(s.objects) > 1 for s in held) < 160  # two thirds multi-object


def test_rendering_is_deterministic_and_puts_colour_where_the_caption_says() -> None:
    scene = _scene(("large", "red", "square", "top left"))
    a = np.asarray(world.render(scene, random.Random(1), size=64, augment=False)).astype(int)
    b = np.asarray(world.render(scene, random.Random(1), size=64, augment=False)).astype(int)
    assert (a == b).all()
    top_left, bottom_right = a[10:22, 10:22].reshape(-1, 3).mean(0), a[42:54, 42:54].reshape(-1, 3).mean(0)
    assert top_left[0] > 180 and top_left[1] < 80
    np.testing.assert_allclose(bottom_right, 128, atol=2)


def test_short_queries_parse_into_structure() -> None:
    q = parse_short_query("a green triangle at the bottom right")
    assert q.specs == (world.Spec("triangle", "green", None, "bottom right"),)
    assert len(parse_short_query("a red circle and a blue square").specs) == 2
    assert all(parse_short_query(s).specs for s in SHORT_QUERIES)


def test_twins_break_or_keep_what_a_query_names() -> None:
    rng = random.Random(7)
    kept_partial = broken_count = 0
    for _ in range(300):
        scene = world.sample_scene(rng, held_out=False)
        query = world.training_query(scene, rng, full_fraction=0.3, forms=world.POSITION_FORMS)
        broken = world.breaking_twin(scene, query, rng)
        kept = world.keeping_twin(scene, query, rng)
        assert broken.signature != scene.signature and kept.signature != scene.signature
        assert not broken.held_out() and not kept.held_out()
        broken_count += not query.matches(broken)  # the hard negative: one named attribute changed
        if not query.exact:
            kept_partial += query.matches(kept)
    assert broken_count > 280  # not all: "a circle" in a scene of two circles survives any one change
    assert kept_partial > 150  # most short queries get a second, different scene they describe


def test_a_position_query_is_broken_by_moving_its_object() -> None:
    scene = _scene(("large", "red", "circle", "top left"), ("small", "blue", "square", "center"))
    query = world.Query((world.Spec("circle", "red", position="top left"),), exact=False)
    changed = {
        tuple(o for o in world.breaking_twin(scene, query, random.Random(i)).objects if o not in scene.objects)
        for i in range(60)
    }
    moved = [objs for objs in changed if any(o.shape == "circle" and o.colour == "red" for o in objs)]
    assert moved  # some twins keep the red circle but put it elsewhere
    assert all(o.position != "top left" for objs in moved for o in objs if o.colour == "red" and o.shape == "circle")
