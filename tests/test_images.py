import numpy as np
import pytest
from PIL import Image

from skcarrot.images import augmented_views, flat_width, to_pil_images


def test_array_batches_of_every_layout():
    rng = np.random.RandomState(0)
    for shape in [(3, 8, 8), (3, 8, 8, 1), (3, 8, 8, 3), (3, 8, 8, 4)]:
        imgs = to_pil_images(rng.randint(0, 256, size=shape).astype(np.uint8))
        assert len(imgs) == 3
        assert all(im.mode == "RGB" and im.size == (8, 8) for im in imgs)


def test_uint8_values_are_kept():
    arr = np.arange(64, dtype=np.uint8).reshape(1, 8, 8) * 4
    img = to_pil_images(arr)[0]
    np.testing.assert_array_equal(np.asarray(img)[..., 0], arr[0])


def test_paths_pil_and_arrays_give_the_same_image(tmp_path):
    arr = np.random.RandomState(1).randint(0, 256, size=(8, 8, 3)).astype(np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    from_path, from_str, from_pil, from_arr = to_pil_images([path, str(path), Image.fromarray(arr), arr])
    for img in (from_str, from_pil, from_arr):
        np.testing.assert_array_equal(np.asarray(img), np.asarray(from_path))


def test_grayscale_and_rgba_pil():
    imgs = to_pil_images([Image.new("L", (5, 4), 7), Image.new("RGBA", (5, 4))])
    assert [im.mode for im in imgs] == ["RGB", "RGB"]
    assert np.asarray(imgs[0])[0, 0].tolist() == [7, 7, 7]


def test_float_images_are_unit_intensities():
    img = to_pil_images(np.full((1, 2, 2), 0.5))[0]
    assert np.asarray(img)[0, 0, 0] == 128


def test_every_format_is_read_by_its_true_range(tmp_path):
    ramp8 = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    expected = np.asarray(to_pil_images(ramp8[None])[0])
    ramp16 = ramp8.astype(np.uint16) * 257  # the same intensities on 16 bits
    path16 = tmp_path / "ramp16.png"
    Image.fromarray(ramp16).save(path16)
    assert Image.open(path16).mode.startswith("I")
    readings = {
        "uint16 array": to_pil_images(ramp16[None])[0],
        "16-bit PNG": to_pil_images([path16])[0],
        "PIL I;16": to_pil_images([Image.fromarray(ramp16)])[0],
        "float 0-255": to_pil_images(ramp8[None].astype(np.float64))[0],
        "float 0-1": to_pil_images(ramp8[None] / 255.0)[0],
        "int64 0-255": to_pil_images(ramp8[None].astype(np.int64))[0],
        "float32 PIL F": to_pil_images([Image.fromarray(ramp8.astype(np.float32) / 255)])[0],
    }
    for name, img in readings.items():
        np.testing.assert_allclose(np.asarray(img, dtype=int), expected, atol=1, err_msg=name)


def test_a_dark_image_in_a_0_255_batch_is_not_brightened():
    images = [np.full((2, 2), 200.0), np.full((2, 2), 1.0)]
    for batch in (np.stack(images), images):  # an array or a list of arrays: one reading
        dark = to_pil_images(batch)[1]
        assert np.asarray(dark)[0, 0, 0] == 1


def test_an_in_memory_32_bit_pil_image_is_read_by_its_values():
    img = Image.new("L", (2, 2), 200).convert("I")
    assert np.asarray(to_pil_images([img])[0])[0, 0, 0] == 200


@pytest.mark.parametrize(
    "batch, match",
    [
        (np.full((2, 2, 2), 16.0), r"values in \[16, 16\] are neither intensities in \[0, 1\] nor 0-255"),
        (np.full((1, 2, 2), 300, dtype=np.int32), r"values in \[300, 300\]"),
        (np.stack([np.zeros((2, 2), np.int16), np.full((2, 2), -3, np.int16)]), r"image 1: image has negative values"),
        (np.full((1, 2, 2), -0.5), r"image 0: image has negative values"),
    ],
)
def test_an_ambiguous_range_raises_and_says_how_to_pass_it(batch, match):
    with pytest.raises(ValueError, match=match) as info:
        to_pil_images(batch)
    assert "uint8" in str(info.value) and "[0, 1]" in str(info.value)


def test_an_array_of_paths_is_read_as_paths(tmp_path):
    arr = np.random.RandomState(1).randint(0, 256, size=(8, 8, 3)).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    imgs = to_pil_images(np.array([str(tmp_path / "a.png")] * 2))
    assert len(imgs) == 2 and np.array_equal(np.asarray(imgs[1]), arr)


def test_an_augmentation_must_return_an_image():
    img = Image.new("RGB", (4, 4))
    with pytest.raises(TypeError, match="augmentation to_array returned ndarray for image 0"):
        def to_array(image, rng):
            return np.asarray(image)

        augmented_views([img], 2, to_array, np.random.RandomState(0))


def test_unreadable_file_names_its_index(tmp_path):
    good = np.zeros((4, 4), dtype=np.uint8)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"image 2: cannot read image file .*broken\.png"):
        to_pil_images([good, good, str(bad)])
    with pytest.raises(ValueError, match=r"image 1: cannot read image file .*missing\.png"):
        to_pil_images([good, str(tmp_path / "missing.png")])


def test_bad_shapes_and_values():
    with pytest.raises(ValueError, match="image 1: an image array must be"):
        to_pil_images([np.zeros((4, 4)), np.zeros((4, 4, 5))])
    with pytest.raises(ValueError, match="image 0: image contains NaN"):
        to_pil_images([np.full((2, 2), np.nan)])
    with pytest.raises(ValueError, match="Reshape your data"):
        to_pil_images(np.zeros(5))
    with pytest.raises(ValueError, match="single"):
        to_pil_images(Image.new("RGB", (2, 2)))
    with pytest.raises(ValueError, match="at least one image"):
        to_pil_images([])
    with pytest.raises(TypeError, match="sparse"):
        import scipy.sparse

        to_pil_images(scipy.sparse.csr_matrix(np.eye(3)))


def test_flat_width():
    pd = pytest.importorskip("pandas")
    assert flat_width(pd.DataFrame(np.zeros((2, 5)))) == 5
    assert flat_width(np.array(["a.png", "b.png"])) is None
    assert flat_width(np.zeros((2, 7))) == 7
    assert flat_width([[1, 2, 3]]) == 3
    assert flat_width([np.zeros((2, 2))]) is None
    assert flat_width(["a.png"]) is None


def test_views_are_seeded_and_keep_the_original():
    imgs = to_pil_images(np.random.RandomState(0).randint(0, 256, size=(4, 16, 16)).astype(np.uint8))
    a = augmented_views(imgs, 3, "crop", np.random.RandomState(5))
    b = augmented_views(imgs, 3, "crop", np.random.RandomState(5))
    c = augmented_views(imgs, 3, "crop", np.random.RandomState(6))
    assert len(a) == 3 and all(len(v) == 4 for v in a)
    assert a[0] == list(imgs)
    same = [np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a[1], b[1])]
    diff = [np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a[1], c[1])]
    assert all(same) and not all(diff)
    assert all(v.size == (16, 16) for v in a[2])


def test_flip_only_flips_and_none_copies():
    img = to_pil_images(np.arange(16, dtype=np.uint8).reshape(1, 4, 4) * 10)[0]
    views = augmented_views([img] * 20, 2, "flip", np.random.RandomState(0))
    flipped = np.asarray(img)[:, ::-1]
    for v in views[1]:
        arr = np.asarray(v)
        assert np.array_equal(arr, np.asarray(img)) or np.array_equal(arr, flipped)
    assert all(np.array_equal(np.asarray(v), np.asarray(img)) for v in augmented_views([img], 3, "none", np.random.RandomState(0))[2])
    with pytest.raises(ValueError, match="augmentation must be one of"):
        augmented_views([img], 2, "rotate", np.random.RandomState(0))
