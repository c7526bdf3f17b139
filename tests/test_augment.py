"""Tests for nanopeft/data/augment.py: every augmentation deterministic under a seed, shape- and range-preserving, and
doing what its albumentations counterpart does; resize + normalise equal to the explicit formula and to PIL."""

import colorsys
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nanopeft.data import augment as A

H, W = 24, 32  # deliberately not square


def gen(seed):
    return torch.Generator().manual_seed(seed)


def image(seed=0, h=H, w=W):
    """A smooth-ish random image in [0, 1]: blurred noise plus a gradient, so warps and blurs visibly change it."""
    x = torch.rand(3, h, w, generator=gen(seed))
    x = F.avg_pool2d(x[None], 3, stride=1, padding=1, count_include_pad=False)[0]
    return (0.5 * x + 0.5 * torch.linspace(0, 1, w)).clamp(0, 1)


# (name, function with p=1): each is random, so two seeds must give different results
RANDOM_OPS = {
    "rotate": partial(A.rotate, p=1.0),
    "shift_scale_rotate": partial(A.shift_scale_rotate, p=1.0),
    "perspective": partial(A.perspective, p=1.0),
    "brightness_contrast": partial(A.brightness_contrast, p=1.0),
    "hue_saturation_value": partial(A.hue_saturation_value, p=1.0),
    "color_jitter": partial(A.color_jitter, p=1.0),
    "gauss_noise": partial(A.gauss_noise, p=1.0),
    "gaussian_blur": partial(A.gaussian_blur, p=1.0),
    "motion_blur": partial(A.motion_blur, p=1.0),
    "coarse_dropout": partial(A.coarse_dropout, p=1.0),
    "augment_medium": partial(A.augment, strength="medium"),
}


@pytest.mark.parametrize("name", list(RANDOM_OPS))
def test_deterministic_shape_range_and_changes_image(name):
    op, x = RANDOM_OPS[name], image()
    a, b = op(x.clone(), gen(1)), op(x.clone(), gen(1))
    assert torch.equal(a, b)  # same seed, same result
    assert a.shape == x.shape and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, x)  # p=1 really changes the image
    # some seed gives a different result (blurs have only a few distinct kernels, so try a few)
    assert any(not torch.equal(a, op(x.clone(), gen(s))) for s in range(2, 6))


@pytest.mark.parametrize("op", [A.hflip, A.rotate, A.shift_scale_rotate, A.perspective, A.brightness_contrast,
                                A.hue_saturation_value, A.color_jitter, A.gauss_noise, A.gaussian_blur,
                                A.motion_blur, A.coarse_dropout])
def test_p0_is_identity(op):
    x = image()
    assert torch.equal(op(x, gen(0), p=0.0), x)


def test_hflip_is_torch_flip():
    x = image()
    assert torch.equal(A.hflip(x, gen(0), p=1.0), torch.flip(x, dims=[-1]))


def test_affine_conventions_match_opencv():
    x = image(h=16, w=16)
    # cv2.getRotationMatrix2D(+90°) turns the picture counter-clockwise = torch.rot90 from rows towards columns;
    # about the centre (w/2 - .5, h/2 - .5) pixel centres land exactly on pixel centres.
    rotated = A._warp(x, A._affine(16, 16, 90.0), "zeros")
    torch.testing.assert_close(rotated, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-6, rtol=0)
    # a positive dx shifts the content right by dx·w pixels; the uncovered strip is the constant 0 border
    x = image()
    shifted = A._warp(x, A._affine(H, W, 0.0, 1.0, dx=0.25), "zeros")
    torch.testing.assert_close(shifted[:, :, 8:], x[:, :, :-8], atol=1e-6, rtol=0)
    assert shifted[:, :, :8].abs().max() == 0
    # scale > 1 zooms in: the centre pixel stays, the image gets no zero border
    zoomed = A._warp(x, A._affine(H, W, 0.0, 1.2), "zeros")
    assert zoomed.min() > 0


def test_rotate_border_is_reflected_not_black():
    x = 0.5 + 0.5 * image()  # strictly positive
    out = A.rotate(x, gen(3), limit=15.0, p=1.0)
    assert out.min() > 0.4  # the corners are filled by reflection, not zeros


def test_combined_warp_equals_two_warps():
    """augment() fuses ShiftScaleRotate and Perspective into one warp; that must equal warping twice."""
    x = image(h=48, w=64)
    s = A._shift_scale_rotate_matrix(gen(0), 48, 64, 0.1, (0.8, 1.2), 15.0)
    p = A._perspective_matrix(gen(1), 48, 64, (0.05, 0.1))
    two = A._warp(A._warp(x, s, "zeros"), p, "zeros")
    one = A._warp(x, s @ p, "zeros")
    inner = (slice(None), slice(8, -8), slice(8, -8))  # borders differ by the second interpolation only
    assert (two[inner] - one[inner]).abs().max() < 0.05
    assert (two - one).abs().mean() < 0.01


def test_homography_maps_corners_and_perspective_stays_inside():
    src = torch.tensor([[0.0, 0], [31, 0], [31, 23], [0, 23]], dtype=torch.float64)
    dst = torch.tensor([[2.0, 1], [29, 3], [30, 20], [1, 22]], dtype=torch.float64)
    hm = A._homography(src, dst)
    mapped = torch.cat([src, torch.ones(4, 1, dtype=torch.float64)], 1) @ hm.T
    torch.testing.assert_close(mapped[:, :2] / mapped[:, 2:], dst)
    # zero jitter is the identity; real jitter keeps the sampled quad inside the image (no black border)
    assert torch.allclose(A._homography(src, src), torch.eye(3, dtype=torch.float64), atol=1e-9)
    x = 0.5 + 0.5 * image()
    for seed in range(5):
        assert A.perspective(x, gen(seed), p=1.0).min() > 0.4


def test_hsv_matches_colorsys_and_round_trips():
    x = torch.rand(3, 4, 5, generator=gen(0), dtype=torch.float64)
    h, s, v = A._rgb_to_hsv(x)
    for i in range(4):
        for j in range(5):
            ref = colorsys.rgb_to_hsv(*x[:, i, j].tolist())
            assert np.allclose([h[i, j].item(), s[i, j].item(), v[i, j].item()], ref, atol=1e-12)
    torch.testing.assert_close(A._hsv_to_rgb(h, s, v), x)
    gray = torch.full((3, 2, 2), 0.3, dtype=torch.float64)
    torch.testing.assert_close(A._hsv_to_rgb(*A._rgb_to_hsv(gray)), gray)


def test_hue_shift_units_are_opencv_uint8():
    """hue_shift_limit=10 is in OpenCV's 0..180 hue units, so a pure red turns by at most 20 degrees."""
    red = torch.zeros(3, 2, 2)
    red[0] = 1
    turns = []
    for seed in range(30):
        h, _, _ = A._rgb_to_hsv(A.hue_saturation_value(red, gen(seed), hue=10.0, sat=0.0, val=0.0))
        turn = (h[0, 0].item() + 0.5) % 1 - 0.5  # signed turn in (-0.5, 0.5]
        turns.append(turn)
    assert max(abs(t) for t in turns) <= 20 / 360 + 1e-6
    assert max(abs(t) for t in turns) > 10 / 360  # would fail if the shift were read as degrees


def test_brightness_contrast_is_gain_plus_bias():
    x = 0.2 + 0.5 * image()  # stays unclipped for |gain - 1|, |bias| <= 0.2
    out = A.brightness_contrast(x, gen(0), brightness=0.2, contrast=0.2)
    gain, bias = np.polyfit(x.flatten().numpy(), out.flatten().numpy(), 1)
    torch.testing.assert_close(out, x * float(gain) + float(bias), atol=1e-5, rtol=0)
    assert abs(gain - 1) <= 0.2 and abs(bias) <= 0.2


def test_color_jitter_keeps_gray_gray():
    gray = torch.full((3, H, W), 0.4) + 0.2 * image()[0:1]  # identical channels
    out = A.color_jitter(gray, gen(0))
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=0)  # saturation/hue cannot colour a gray image
    torch.testing.assert_close(out[1], out[2], atol=1e-5, rtol=0)


def test_blur_kernels_are_opencvs():
    impulse = torch.zeros(3, 11, 11)
    impulse[:, 5, 5] = 1
    binomial = {3: torch.tensor([1.0, 2, 1]) / 4, 5: torch.tensor([1.0, 4, 6, 4, 1]) / 16}
    seen = set()
    for seed in range(12):
        out = A.gaussian_blur(impulse, gen(seed))[0]
        k = int((out[5] > 0).sum())  # the response's width is the kernel size
        seen.add(k)
        torch.testing.assert_close(out[5 - k // 2:6 + k // 2, 5 - k // 2:6 + k // 2],
                                   torch.outer(binomial[k], binomial[k]))
        line = A.motion_blur(impulse, gen(seed))[0]
        assert abs(line.sum().item() - 1) < 1e-6 and (line > 0).sum() >= 2
        assert (line[line > 0] - line[line > 0][0]).abs().max() < 1e-6  # a line of equal weights
    assert seen == {3, 5}
    flat = torch.full((3, 8, 8), 0.7)  # reflect-101 borders keep a constant image constant
    torch.testing.assert_close(A.gaussian_blur(flat, gen(0)), flat)
    torch.testing.assert_close(A.motion_blur(flat, gen(0)), flat)


def test_gauss_noise_strength():
    x = torch.full((3, 64, 64), 0.5)
    stds = [(A.gauss_noise(x, gen(s)) - x).std().item() * 255 for s in range(8)]
    assert all(np.sqrt(10) * 0.9 < s < np.sqrt(50) * 1.1 for s in stds)  # variance 10..50 on the 0-255 scale


def test_coarse_dropout_holes():
    x = torch.ones(3, 40, 50)
    for seed in range(5):
        out = A.coarse_dropout(x, gen(seed), p=1.0)
        zero = (out == 0).all(0)
        hole = 4 * 5  # int(0.1 * 40) × int(0.1 * 50)
        assert hole <= zero.sum() <= 8 * hole
        assert torch.equal(out[:, ~zero], x[:, ~zero])  # everything else untouched


def test_augment_pipeline_strengths():
    x = image()
    assert torch.equal(A.augment(x, gen(0), "none"), x)
    with pytest.raises(ValueError, match="strength"):
        A.augment(x, gen(0), "extreme")
    outs = {s: A.augment(x, gen(7), s) for s in ("light", "medium", "heavy")}
    for out in outs.values():
        assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert A.STRENGTHS["medium"] == dict(brightness=0.2, contrast=0.2, rotate=15.0, scale=(0.8, 1.2))
    # the pipeline ignores global RNG state
    torch.manual_seed(123)
    a = A.augment(x, gen(7), "medium")
    torch.manual_seed(456)
    assert torch.equal(a, A.augment(x, gen(7), "medium"))


def test_resize_normalize_is_the_explicit_formula():
    x = image(h=50, w=70)
    out = A.resize_normalize(x, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    ref = F.interpolate(x[None], size=(32, 32), mode="bilinear", align_corners=False, antialias=True)[0]
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, (ref - mean) / std, atol=0, rtol=0)
    assert A.resize_normalize(x, (16, 24)).shape == (3, 16, 24)


def test_resize_matches_pil_bilinear():
    """Antialiased bilinear = PIL's BILINEAR resize (what HF's slow processor uses) to within uint8 rounding."""
    rgb = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    ours = A.resize_normalize(x, (24, 32))
    pil = np.asarray(Image.fromarray(rgb).resize((32, 24), Image.BILINEAR), dtype=np.float32) / 255
    std = torch.tensor(A.IMAGENET_STD).view(3, 1, 1)
    pixels = ours * std + torch.tensor(A.IMAGENET_MEAN).view(3, 1, 1)  # undo the normalisation
    assert (pixels - torch.from_numpy(pil).permute(2, 0, 1)).abs().max() < 1.01 / 255
