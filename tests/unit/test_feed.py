"""Normalization, augmentation and padded chunks."""

from __future__ import annotations

import numpy as np
import pytest

from dpscale.runner import feed


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8)


def test_normalize_uses_fixed_imagenet_constants(images):
    x = feed.normalize(images)
    assert x.dtype == np.float32 and x.shape == images.shape
    expected = (images[3, 2, 5] / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array(
        [0.229, 0.224, 0.225]
    )
    np.testing.assert_allclose(x[3, 2, 5], expected, rtol=1e-6)
    # constants, not batch statistics: one image normalizes the same alone or in a batch
    np.testing.assert_array_equal(feed.normalize(images[3:4])[0], x[3])


def test_normalize_rejects_wrong_input(images):
    with pytest.raises(ValueError, match="expected uint8"):
        feed.normalize(images.astype(np.float32))


def test_augment_is_seeded_crop_and_flip(images):
    a = feed.augment(images, np.random.default_rng(5))
    b = feed.augment(images, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert a.shape == images.shape and a.dtype == np.uint8
    # every output is some crop of the zero-padded image, possibly flipped
    rng = np.random.default_rng(5)
    offsets = rng.integers(0, 9, size=(12, 2))
    flips = rng.random(12) < 0.5
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    for i in range(12):
        dy, dx = offsets[i]
        crop = padded[i, dy : dy + 8, dx : dx + 8]
        np.testing.assert_array_equal(a[i], crop[:, ::-1] if flips[i] else crop)
    assert flips.any() and not flips.all()
    assert not np.array_equal(a, feed.augment(images, np.random.default_rng(6)))


def test_centered_crop_without_flip_is_identity(images):
    class Fixed:  # a generator that always picks the centre and never flips
        def integers(self, low, high, size):
            return np.full(size, 4)

        def random(self, n):
            return np.ones(n)

    np.testing.assert_array_equal(feed.augment(images, Fixed()), images)


def test_make_batch_pads_and_masks(images):
    labels = np.arange(12, dtype=np.int64) % 3
    rows = np.array([5, 2, 9, 0, 0, 0])
    mask = np.array([True, True, True, False, False, False])
    batch = feed.make_batch(images, labels, rows, mask)
    assert batch.x.shape == (6, 8, 8, 3) and batch.x.dtype == np.float32
    assert batch.size == 3
    np.testing.assert_array_equal(batch.x[:3], feed.normalize(images[[5, 2, 9]]))
    assert not batch.x[3:].any()
    np.testing.assert_array_equal(batch.y, [2, 2, 0, 0, 0, 0])


def test_make_batch_augments_only_real_rows_reproducibly(images):
    labels = np.zeros(12, dtype=np.int64)
    rows, mask = np.array([1, 2, 0, 0]), np.array([True, True, False, False])
    a = feed.make_batch(images, labels, rows, mask, np.random.default_rng(1))
    b = feed.make_batch(images, labels, rows, mask, np.random.default_rng(1))
    np.testing.assert_array_equal(a.x, b.x)
    expected = feed.normalize(feed.augment(images[[1, 2]], np.random.default_rng(1)))
    np.testing.assert_array_equal(a.x[:2], expected)
    assert not a.x[2:].any()


def test_eval_chunks_cover_rows_with_fixed_shape(images):
    chunks = list(feed.eval_chunks(images, np.arange(10), 4))
    assert [n for _, n in chunks] == [4, 4, 2]
    assert all(x.shape == (4, 8, 8, 3) for x, _ in chunks)
    np.testing.assert_array_equal(chunks[2][0][:2], feed.normalize(images[8:10]))
    assert not chunks[2][0][2:].any()
