"""The global batch plan: same-bucket batches, the same number per rank, deterministic."""
from __future__ import annotations

from collections import Counter

import pytest

from flux_ray.data.loader import Sample, batch_plan, rank_batches


def _samples(bucket_sizes: dict[tuple[int, int], int], repeats: int = 0) -> list[Sample]:
    out = []
    for (w, h), n in bucket_sizes.items():
        out += [Sample(f"{w}x{h}-{i:04d}", "d", (w, h), "c", "shard", i, repeats) for i in range(n)]
    return out


UNEVEN = {(128, 128): 13, (192, 128): 5, (128, 192): 1, (256, 64): 7}


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("bs", [1, 2, 4])
def test_every_rank_gets_the_same_number_of_same_bucket_batches(world, bs):
    samples = _samples(UNEVEN)
    plan = batch_plan(samples, bs, world, seed=7, epoch=0)
    per_rank = [rank_batches(plan, r, world) for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1
    for batches in per_rank:
        for b in batches:
            assert len(b) == bs and len({s.bucket for s in b}) == 1
    seen = Counter(s.sample_id for b in plan for s in b)
    assert set(seen) == {s.sample_id for s in samples}  # nobody is dropped, small buckets included


def test_plan_is_deterministic_per_seed_and_epoch_and_shuffles_between_epochs():
    samples = _samples(UNEVEN)
    a = batch_plan(samples, 2, 2, seed=1, epoch=0)
    assert a == batch_plan(list(reversed(samples)), 2, 2, seed=1, epoch=0)
    assert a != batch_plan(samples, 2, 2, seed=1, epoch=1)
    assert a != batch_plan(samples, 2, 2, seed=2, epoch=0)


def test_repeats_multiply_a_datasets_samples():
    plain = batch_plan(_samples({(128, 128): 8}), 1, 1, seed=0, epoch=0)
    rep = batch_plan(_samples({(128, 128): 8}, repeats=2), 1, 1, seed=0, epoch=0)
    assert len(plain) == 8 and len(rep) == 24
    assert set(Counter(b[0].sample_id for b in rep).values()) == {3}


def test_fewer_batches_than_ranks_still_gives_every_rank_one():
    plan = batch_plan(_samples({(128, 128): 1}), 1, 3, seed=0, epoch=0)
    assert [len(rank_batches(plan, r, 3)) for r in range(3)] == [1, 1, 1]


def test_images_with_several_captions_draw_one_per_seed_and_epoch():
    """Each image trains on one of its captions per epoch: the same draw for the same (seed, epoch) whatever the
    rank or sample order (resume stays exact), different draws across epochs, every caption drawn over time."""
    from dataclasses import replace

    from flux_ray.data.loader import epoch_captions

    samples = [replace(s, caption_ids=(f"{s.sample_id}-a", f"{s.sample_id}-b", f"{s.sample_id}-c"))
               for s in _samples(UNEVEN)]
    draws = {e: {s.sample_id: s.caption_id for s in epoch_captions(samples, 7, e)} for e in range(6)}
    assert draws[0] == {s.sample_id: s.caption_id for s in epoch_captions(list(reversed(samples)), 7, 0)}
    assert draws[0] != draws[1] and draws[0] != {s.sample_id: s.caption_id for s in epoch_captions(samples, 8, 0)}
    assert {c[-1] for d in draws.values() for c in d.values()} == {"a", "b", "c"}
    assert all(len({d[s.sample_id] for d in draws.values()}) > 1 for s in samples[:10])
    plan = batch_plan(samples, 2, 2, seed=7, epoch=3)
    assert {s.sample_id: s.caption_id for b in plan for s in b} == draws[3]
    single = _samples(UNEVEN)  # one caption: untouched
    assert epoch_captions(single, 7, 0) == single
