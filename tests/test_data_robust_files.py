"""Robust reading of single files (tailedcore_jax.data.mvtec): corrupt and truncated files,
the documented image-mode -> RGB conversions and mask-mode handling, with exact pixel values."""

import io
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from tailedcore_jax.data.mvtec import (
    DatasetError,
    DatasetFileNotFoundError,
    load_image,
    load_mask,
    preprocess_image,
    preprocess_mask,
    read_image,
    read_mask,
)


def _png(w, h, bit_depth, color_type, rows):
    """A PNG written by hand (PIL cannot write 16-bit RGB / RGBA / LA)."""

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    raw = b"".join(b"\x00" + bytes(r) for r in rows)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _rgb_png_bytes(rng, w=40, h=30):
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(b, format="PNG")
    return b.getvalue()


def _pixels(path):
    return np.asarray(read_image(path))


# --------------------------------------------------------------------------------------------
# 1. corrupt and truncated files
# --------------------------------------------------------------------------------------------


def test_load_truncated_images_flag_is_left_false():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# the last 20 bytes of a PNG are the zlib checksum, the IDAT CRC and the IEND chunk: PIL's
# load() alone decodes all these cuts without an error
@pytest.mark.parametrize("cut", [1, 3, 4, 5, 12, 16, 17, 20, 100, 0.5])
def test_truncated_png_raises_naming_the_file(tmp_path, rng, cut):
    data = _rgb_png_bytes(rng)
    keep = int(len(data) * cut) if isinstance(cut, float) else len(data) - cut
    p = tmp_path / "cut.png"
    p.write_bytes(data[:keep])
    with pytest.raises(DatasetError, match=rf"cannot read image {re.escape(str(p))}: "):
        read_image(p)
    with pytest.raises(DatasetError, match=rf"cannot read mask {re.escape(str(p))}: "):
        read_mask(p)


def test_png_without_iend_has_its_own_message(tmp_path, rng):
    p = tmp_path / "no_iend.png"
    p.write_bytes(_rgb_png_bytes(rng)[:-2])
    with pytest.raises(DatasetError, match=r"no_iend\.png: truncated PNG \(no IEND chunk\)"):
        read_image(p)


def test_png_with_a_flipped_byte_raises(tmp_path, rng):
    data = bytearray(_rgb_png_bytes(rng))
    data[len(data) // 2] ^= 0x10  # inside IDAT: caught by the chunk CRC
    p = tmp_path / "flipped.png"
    p.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"cannot read image .*flipped\.png: .*checksum"):
        read_image(p)


@pytest.mark.parametrize("keep", [2, 0.5, 0.9])
def test_truncated_jpeg_raises(tmp_path, rng, keep):
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(b, format="JPEG")
    data = b.getvalue()
    p = tmp_path / "cut.jpg"
    n = len(data) - keep if isinstance(keep, int) else int(len(data) * keep)
    p.write_bytes(data[:n])
    with pytest.raises(DatasetError, match=r"cannot read image .*cut\.jpg: "):
        load_image(p)


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n"])
def test_empty_and_garbage_files_raise(tmp_path, content):
    p = tmp_path / "bad.png"
    p.write_bytes(content)
    with pytest.raises(DatasetError, match=r"cannot read image .*bad\.png: "):
        read_image(p)


def test_missing_file_is_a_dataset_error_and_a_file_not_found_error(tmp_path):
    with pytest.raises(DatasetFileNotFoundError, match=r"image file not found: .*nope\.png") as e:
        read_image(tmp_path / "nope.png")
    assert isinstance(e.value, DatasetError) and isinstance(e.value, FileNotFoundError)
    with pytest.raises(DatasetFileNotFoundError, match=r"mask file not found: .*nope_mask\.png"):
        read_mask(tmp_path / "nope_mask.png")


def test_reading_refuses_while_load_truncated_images_is_true(tmp_path, rng, monkeypatch):
    p = tmp_path / "ok.png"
    p.write_bytes(_rgb_png_bytes(rng))
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DatasetError, match=r"cannot read image .*ok\.png: .*LOAD_TRUNCATED_IMAGES"):
        read_image(p)
    with pytest.raises(DatasetError, match=r"cannot read mask .*ok\.png: .*LOAD_TRUNCATED_IMAGES"):
        read_mask(p)


def test_valid_png_still_reads_exactly(tmp_path, rng):
    arr = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    p = tmp_path / "ok.png"
    Image.fromarray(arr).save(p)
    np.testing.assert_array_equal(_pixels(p), arr)


# --------------------------------------------------------------------------------------------
# 2. image modes -> RGB (exact values)
# --------------------------------------------------------------------------------------------


def test_grey_l_is_replicated(tmp_path):
    p = tmp_path / "grey.png"
    Image.fromarray(np.array([[0, 7, 128, 255]], np.uint8), "L").save(p)
    assert Image.open(p).mode == "L"
    np.testing.assert_array_equal(_pixels(p), [[[0] * 3, [7] * 3, [128] * 3, [255] * 3]])
    # the float output is the same value / 255 in all three channels
    x = load_image(p, resize=None, crop=None, normalize=False)
    np.testing.assert_array_equal(x[0, 2], np.float32(128) / np.float32(255))


def test_bilevel_1_gives_0_and_255(tmp_path):
    p = tmp_path / "bw.png"
    Image.fromarray(np.array([[False, True]])).save(p)
    assert Image.open(p).mode == "1"
    np.testing.assert_array_equal(_pixels(p), [[[0, 0, 0], [255, 255, 255]]])


def test_low_bit_depth_grey_png_is_scaled_by_pil(tmp_path):
    p = tmp_path / "two_bit.png"
    p.write_bytes(_png(4, 1, 2, 0, [[0b00011011]]))  # 2-bit grey 0, 1, 2, 3
    np.testing.assert_array_equal(_pixels(p)[0, :, 0], [0, 85, 170, 255])


def test_palette_is_looked_up_and_transparency_ignored(tmp_path):
    im = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    im.putpalette([0, 0, 0, 255, 0, 0, 10, 20, 30])
    p = tmp_path / "pal.png"
    im.save(p, transparency=1)
    assert Image.open(p).mode == "P"
    np.testing.assert_array_equal(_pixels(p), [[[0, 0, 0], [255, 0, 0], [10, 20, 30]]])
    pa = im.convert("PA")  # in memory (PNG cannot store PA)
    np.testing.assert_array_equal(
        preprocess_image(pa, resize=None, crop=None, normalize=False) * 255,
        [[[0, 0, 0], [255, 0, 0], [10, 20, 30]]],
    )


def test_rgba_and_la_drop_alpha_without_compositing(tmp_path):
    rgba = np.array([[[10, 20, 30, 0], [200, 100, 50, 128], [1, 2, 3, 255]]], np.uint8)
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(p)
    # dropped: colours as stored (compositing on black would give 0 and (100, 50, 25))
    np.testing.assert_array_equal(_pixels(p), rgba[..., :3])
    la = np.array([[[7, 0], [200, 255]]], np.uint8)
    q = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(q)
    assert Image.open(q).mode == "LA"
    np.testing.assert_array_equal(_pixels(q), [[[7] * 3, [200] * 3]])
    # an RGBA array is handled the same way
    np.testing.assert_array_equal(
        np.round(preprocess_image(rgba, resize=None, crop=None, normalize=False) * 255),
        rgba[..., :3],
    )


SIXTEEN = [0x0000, 0x00FF, 0x0100, 0x1234, 0x7FFF, 0x8000, 0xFF00, 0xFFFF]
SIXTEEN_TO_EIGHT = [0, 0, 1, 0x12, 0x7F, 0x80, 0xFF, 0xFF]  # v >> 8


def test_16_bit_grey_png_is_shifted_right_by_8(tmp_path):
    p = tmp_path / "grey16.png"
    Image.fromarray(np.array([SIXTEEN], np.uint16)).save(p)
    assert Image.open(p).mode == "I;16"
    got = _pixels(p)
    np.testing.assert_array_equal(got[0, :, 0], SIXTEEN_TO_EIGHT)
    np.testing.assert_array_equal(got[..., 0], got[..., 1])
    np.testing.assert_array_equal(got[..., 0], got[..., 2])
    # an in-memory 16-bit PIL image gives the same (PIL's own convert would clip at 255)
    im = Image.fromarray(np.array([SIXTEEN], np.uint16))
    x = preprocess_image(im, resize=None, crop=None, normalize=False)
    np.testing.assert_array_equal(np.round(x[0, :, 0] * 255), SIXTEEN_TO_EIGHT)


def test_16_bit_big_endian_tiff_and_mode_i(tmp_path):
    arr = np.array([SIXTEEN], np.uint16)
    p = tmp_path / "grey16.tif"
    Image.fromarray(arr).save(p)
    np.testing.assert_array_equal(_pixels(p)[0, :, 0], SIXTEEN_TO_EIGHT)
    q = tmp_path / "grey32.tif"
    Image.fromarray(arr.astype(np.int32)).save(q)
    assert Image.open(q).mode == "I"
    np.testing.assert_array_equal(_pixels(q)[0, :, 0], SIXTEEN_TO_EIGHT)
    r = tmp_path / "wide.tif"
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(r)
    with pytest.raises(
        DatasetError, match=r"image .*wide\.tif has mode 'I' with values outside .*max 70000"
    ):
        read_image(r)


def test_16_bit_rgb_rgba_la_pngs_keep_the_high_byte(tmp_path):
    rgb = np.array([[[0x1234, 0xABCD, 0x00FF], [0xFFFF, 0x0100, 0x8000]]], ">u2")
    p = tmp_path / "rgb16.png"
    p.write_bytes(_png(2, 1, 16, 2, [rgb[0].tobytes()]))
    np.testing.assert_array_equal(_pixels(p), [[[0x12, 0xAB, 0x00], [0xFF, 0x01, 0x80]]])
    rgba = np.array([[[0x1234, 0xABCD, 0x00FF, 0x0000], [0xFFFF, 0x0100, 0x8000, 0x7777]]], ">u2")
    q = tmp_path / "rgba16.png"
    q.write_bytes(_png(2, 1, 16, 6, [rgba[0].tobytes()]))
    np.testing.assert_array_equal(_pixels(q), [[[0x12, 0xAB, 0x00], [0xFF, 0x01, 0x80]]])
    la = np.array([[[0x1234, 0x0000], [0xFFFF, 0x7777]]], ">u2")
    r = tmp_path / "la16.png"
    r.write_bytes(_png(2, 1, 16, 4, [la[0].tobytes()]))
    np.testing.assert_array_equal(_pixels(r), [[[0x12] * 3, [0xFF] * 3]])


def test_unsupported_modes_raise_naming_the_file(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(p)
    with pytest.raises(DatasetError, match=r"image .*cmyk\.jpg has unsupported mode 'CMYK'"):
        read_image(p)
    q = tmp_path / "float.tif"
    Image.fromarray(np.zeros((2, 2), np.float32)).save(q)
    with pytest.raises(DatasetError, match=r"image .*float\.tif has unsupported mode 'F'"):
        read_image(q)


# --------------------------------------------------------------------------------------------
# 8. masks: binary check, 16-bit, alpha, colour, palette
# --------------------------------------------------------------------------------------------

MASK = np.array([[0, 255, 255], [0, 0, 255]], np.uint8)


def _save(tmp_path, name, arr, mode=None):
    p = tmp_path / name
    Image.fromarray(arr, mode).save(p)
    return p


def test_8_bit_mask_values_are_checked(tmp_path):
    np.testing.assert_array_equal(read_mask(_save(tmp_path, "m.png", MASK, "L")), MASK)
    soft = MASK.copy()
    soft[0, 0] = 3
    p = _save(tmp_path, "soft.png", soft, "L")
    want = r"mask .*soft\.png is not binary: .*0/255 \(e\.g\. \[3\]"
    with pytest.raises(DatasetError, match=want):
        read_mask(p)
    np.testing.assert_array_equal(read_mask(p, mask_values="nonzero")[0], [255, 255, 255])


def test_16_bit_mask_must_be_0_or_65535(tmp_path):
    p = _save(tmp_path, "m16.png", MASK.astype(np.uint16) * 257)  # 0 / 65535
    assert Image.open(p).mode == "I;16"
    np.testing.assert_array_equal(read_mask(p), MASK)
    np.testing.assert_array_equal(load_mask(p, resize=None, crop=None), MASK // 255)
    # 0 / 255 stored in 16 bits would become all zero by >> 8: refused instead
    q = _save(tmp_path, "m16_low.png", MASK.astype(np.uint16))
    with pytest.raises(
        DatasetError, match=r"mask .*m16_low\.png is not binary: .*0/65535 \(a 16-bit mask"
    ):
        read_mask(q)
    np.testing.assert_array_equal(read_mask(q, mask_values="nonzero"), MASK)
    r = _save(tmp_path, "m16_one.png", (MASK > 0).astype(np.uint16))  # 0 / 1 labels
    np.testing.assert_array_equal(read_mask(r, mask_values="nonzero"), MASK)


def test_mask_alpha_channel_is_dropped(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = MASK[..., None]
    rgba[..., 3] = [[0, 0, 255], [255, 255, 0]]  # alpha unrelated to the mask
    np.testing.assert_array_equal(read_mask(_save(tmp_path, "rgba.png", rgba, "RGBA")), MASK)
    la = np.stack([MASK, 255 - MASK], -1)
    np.testing.assert_array_equal(read_mask(_save(tmp_path, "la.png", la, "LA")), MASK)


def test_colour_masks(tmp_path):
    grey = np.repeat(MASK[..., None], 3, -1)
    np.testing.assert_array_equal(read_mask(_save(tmp_path, "grey_rgb.png", grey, "RGB")), MASK)
    red = np.zeros((2, 3, 3), np.uint8)
    red[..., 0] = MASK
    p = _save(tmp_path, "red.png", red, "RGB")
    with pytest.raises(
        DatasetError,
        match=r"mask .*red\.png is a colour image: its R, G, B channels differ at 3 pixels "
        r"\(first at row 0, column 1: \(255, 0, 0\)\)",
    ):
        read_mask(p)
    blue_one = np.zeros((2, 3, 3), np.uint8)
    blue_one[..., 2] = MASK > 0  # (0, 0, 1): luma would round it to 0
    got = read_mask(_save(tmp_path, "blue.png", blue_one, "RGB"), mask_values="nonzero")
    np.testing.assert_array_equal(got, MASK)


def test_palette_mask_uses_indices_not_colours(tmp_path):
    im = Image.fromarray((MASK > 0).astype(np.uint8), "P")
    im.putpalette([255, 255, 255, 0, 0, 0])  # index 0 white, 1 black: colours are ignored
    p = tmp_path / "pal_mask.png"
    im.save(p)
    assert Image.open(p).mode == "P"
    with pytest.raises(DatasetError, match=r"mask .*pal_mask\.png is not binary: .*\[1\]"):
        read_mask(p)
    np.testing.assert_array_equal(read_mask(p, mask_values="nonzero"), MASK)


def test_bilevel_mask_and_unsupported_mask_mode(tmp_path):
    np.testing.assert_array_equal(read_mask(_save(tmp_path, "bw.png", MASK > 0)), MASK)
    q = tmp_path / "float_mask.tif"
    Image.fromarray(MASK.astype(np.float32)).save(q)
    with pytest.raises(DatasetError, match=r"mask .*float_mask\.tif has unsupported mode 'F'"):
        read_mask(q)


def test_array_masks_unchanged(tmp_path):
    np.testing.assert_array_equal(
        preprocess_mask(MASK, resize=None, crop=None), (MASK == 255).astype(np.uint8)
    )
    with pytest.raises(DatasetError, match=r"mask <array> must be single-channel"):
        preprocess_mask(np.zeros((4, 4, 3), np.uint8))
    np.testing.assert_array_equal(preprocess_mask(MASK > 0, resize=None, crop=None), MASK // 255)
