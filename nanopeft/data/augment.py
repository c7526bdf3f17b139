"""Training augmentations in plain torch ops: the seed paper's albumentations "medium" pipeline.

The seed notebooks (module 5; docs/RECIPE.md ("The recipe")) augment uint8 HWC images with albumentations 1.3.1:

    HorizontalFlip(.5) -> Rotate(15°, .5) -> ShiftScaleRotate(.1, ±20%, 15°, border 0, .5) -> Perspective(.05-.1, .3)
    -> OneOf[RandomBrightnessContrast | HueSaturationValue | ColorJitter](.8)
    -> OneOf[GaussNoise | GaussianBlur | MotionBlur](.3) -> CoarseDropout(1-8 holes, .2) -> Resize 224 -> Normalize

Here each step is a small function `f(x, g, ..., p)` on a float (3, H, W) tensor in [0, 1] at the image's original
size. All randomness comes from the explicit `torch.Generator` g, so an augmented sample is a pure function of
(image, seed): no global RNG, hence no dependence on DataLoader worker count or order. Every step keeps the shape
and the [0, 1] range. Deliberate differences from albumentations: float arithmetic instead of uint8 look-up tables
(no rounding between steps), torch's bilinear grid_sample instead of cv2.warpAffine, and the smaller ones named in
each docstring. `resize_normalize` is the final step shared by train, val, test and inference: one pipeline
everywhere (the seed code fed the model differently scaled inputs at train and test time: docs/RECIPE.md
("Fixes to the recipe")).
"""

import math
from functools import partial

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv3 LVD-1689M preprocessing (docs/DINOV3.md ("Preprocessing"))
IMAGENET_STD = (0.229, 0.224, 0.225)

# The notebook's strength presets (AugmentationPipeline._build_train_transform): strength scales brightness/contrast
# (in both RandomBrightnessContrast and ColorJitter), the rotation limit (Rotate and ShiftScaleRotate) and the scale
# range. Shift (0.1), perspective, hue/saturation and noise/blur/dropout are the same at every strength.
STRENGTHS = {
    "light": dict(brightness=0.1, contrast=0.1, rotate=10.0, scale=(0.9, 1.1)),
    "medium": dict(brightness=0.2, contrast=0.2, rotate=15.0, scale=(0.8, 1.2)),  # the paper's setting
    "heavy": dict(brightness=0.3, contrast=0.3, rotate=20.0, scale=(0.7, 1.3)),
}
STRENGTH_NAMES = ("none", *STRENGTHS)  # "none": augmented variants are clean copies


# ----------------------------------------------------------------------------- random draws, all from g
def _rand(g):
    return torch.rand((), generator=g).item()


def _uniform(g, lo, hi):
    return lo + (hi - lo) * _rand(g)


def _randint(g, lo, hi):  # inclusive on both ends, like random.randint
    return int(torch.randint(lo, hi + 1, (), generator=g))


def _coin(g, p):
    return _rand(g) < p


# ----------------------------------------------------------------------------- geometry
def _warp(x, m, padding_mode):
    """out[:, i, j] = bilinear sample of x at source pixel m @ (j, i, 1), pixel centres at integer coordinates.

    m (3, 3) maps OUTPUT to SOURCE pixels (an inverse map, what grid_sample needs); affine or projective, which is
    why the grid is built here rather than by F.affine_grid (it cannot express a homography).
    padding_mode: "zeros" (cv2.BORDER_CONSTANT, value 0) or "reflection" (about the image edge: cv2.BORDER_REFLECT,
    one pixel off albumentations' BORDER_REFLECT_101, which does not repeat the edge pixel).
    """
    _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    pts = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1) @ m.T  # (H, W, 3) homogeneous source points
    src = pts[..., :2] / pts[..., 2:]  # (H, W, 2) source (x, y) in pixels
    # align_corners=False: pixel centre j sits at (2j + 1) / W - 1 in grid_sample's [-1, 1] coordinates
    grid = (2 * src + 1) / torch.tensor([w, h], dtype=torch.float64) - 1
    out = F.grid_sample(x[None], grid[None].to(x.dtype), mode="bilinear", padding_mode=padding_mode,
                        align_corners=False)[0]  # (C, H, W)
    return out.clamp_(0, 1)  # bilinear weights sum to 1 only up to rounding


def _affine(h, w, angle, scale=1.0, dx=0.0, dy=0.0):
    """Inverse of albumentations' rotate/shift_scale_rotate matrix (float64 (3, 3), output -> source pixels).

    Forward (source -> output) is cv2.getRotationMatrix2D(centre=(w/2 - .5, h/2 - .5), angle, scale) plus a shift
    of (dx·w, dy·h): positive angle turns the picture counter-clockwise, positive dx moves it right.
    """
    a, b = scale * math.cos(math.radians(angle)), scale * math.sin(math.radians(angle))
    cx, cy = w / 2 - 0.5, h / 2 - 0.5
    forward = torch.tensor([[a, b, (1 - a) * cx - b * cy + dx * w],
                            [-b, a, b * cx + (1 - a) * cy + dy * h],
                            [0.0, 0.0, 1.0]], dtype=torch.float64)
    return torch.linalg.inv(forward)


def _homography(src, dst):
    """(3, 3) H with H @ (u, v, 1) ∝ (x, y, 1) for the 4 point pairs src (4, 2) -> dst (4, 2), i.e.
    cv2.getPerspectiveTransform: solve the 8 linear equations x·(h7 u + h8 v + 1) = h1 u + h2 v + h3 (same for y)."""
    rows, rhs = [], []
    for (u, v), (x, y) in zip(src.tolist(), dst.tolist()):
        rows += [[u, v, 1, 0, 0, 0, -u * x, -v * x], [0, 0, 0, u, v, 1, -u * y, -v * y]]
        rhs += [x, y]
    h8 = torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64))
    return torch.cat([h8, torch.ones(1, dtype=torch.float64)]).view(3, 3)


def _shift_scale_rotate_matrix(g, h, w, shift, scale, rotate):
    angle = _uniform(g, -rotate, rotate)  # albumentations' draw order: angle, scale, dx, dy
    s = _uniform(g, *scale)
    dx, dy = _uniform(g, -shift, shift), _uniform(g, -shift, shift)
    return _affine(h, w, angle, s, dx, dy)


def _perspective_matrix(g, h, w, scale):
    """Albumentations' Perspective: corners jittered inward by |N(0, σ²)| mod 0.32 of the side, σ ~ U(scale); the
    quadrilateral they span is stretched over the whole output (keep_size=True), a small zoom with a tilt. The
    output's corner pixel centres map onto the quad's corners (albumentations warps to a max_width × max_height
    rectangle, then resizes: the same map up to about a pixel). Returns output -> source."""
    sigma = _uniform(g, *scale)
    jitter = (torch.randn(4, 2, generator=g, dtype=torch.float64) * sigma).abs() % 0.32  # (4, 2) side fractions
    unit = torch.tensor([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=torch.float64)  # tl, tr, br, bl
    size = torch.tensor([w - 1, h - 1], dtype=torch.float64)
    quad = (unit + (1 - 2 * unit) * jitter) * size  # each corner moves towards the inside
    return _homography(unit * size, quad)


def hflip(x, g, p=0.5):
    """A.HorizontalFlip: mirror left-right."""
    return x.flip(-1) if _coin(g, p) else x


def rotate(x, g, limit=15.0, p=0.5):
    """A.Rotate(limit): angle ~ U(±limit)° about the centre, bilinear, reflected border (see `_warp`)."""
    if not _coin(g, p):
        return x
    return _warp(x, _affine(x.shape[1], x.shape[2], _uniform(g, -limit, limit)), "reflection")


def shift_scale_rotate(x, g, shift=0.1, scale=(0.8, 1.2), rotate=15.0, p=0.5):
    """A.ShiftScaleRotate(shift_limit, scale_limit=scale - 1, rotate_limit, BORDER_CONSTANT, value=0): one affine
    warp; shift is a fraction of the side, scale a zoom factor, uncovered pixels are 0."""
    if not _coin(g, p):
        return x
    return _warp(x, _shift_scale_rotate_matrix(g, x.shape[1], x.shape[2], shift, scale, rotate), "zeros")


def perspective(x, g, scale=(0.05, 0.1), p=0.3):
    """A.Perspective(scale, keep_size=True): see `_perspective_matrix`."""
    if not _coin(g, p):
        return x
    return _warp(x, _perspective_matrix(g, x.shape[1], x.shape[2], scale), "zeros")


# ----------------------------------------------------------------------------- colour
_GRAY = (0.299, 0.587, 0.114)  # cv2.COLOR_RGB2GRAY weights (ITU-R BT.601), used by albumentations' ColorJitter


def _gray(x):  # (3, H, W) -> (1, H, W)
    return torch.einsum("chw,c->hw", x, torch.tensor(_GRAY, dtype=x.dtype))[None]


def _rgb_to_hsv(x):
    """(3, H, W) RGB in [0, 1] -> hue (fraction of a turn), saturation, value, each (H, W) (hexcone model)."""
    r, gr, b = x
    v = x.amax(0)
    c = v - x.amin(0)  # chroma
    s = c / v.clamp_min(1e-12)  # v = 0 implies c = 0, so s = 0
    cc = c.clamp_min(1e-12)
    h = torch.where(v == r, (gr - b) / cc, torch.where(v == gr, 2 + (b - r) / cc, 4 + (r - gr) / cc))  # sixths
    return torch.where(c > 0, (h / 6) % 1, torch.zeros_like(h)), s, v


def _hsv_to_rgb(h, s, v):
    # f(n) = v - v·s·clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6; (R, G, B) = (f(5), f(3), f(1))
    k = (torch.tensor([5.0, 3.0, 1.0], dtype=h.dtype).view(3, 1, 1) + 6 * h) % 6  # (3, H, W)
    return v - v * s * torch.minimum(k, 4 - k).clamp(0, 1)


def _turn_hue(x, turn):  # rotate the hue by `turn` (fraction of a full circle)
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb((h + turn) % 1, s, v)


def brightness_contrast(x, g, brightness=0.2, contrast=0.2, p=1.0):
    """A.RandomBrightnessContrast(brightness_by_max=True): x·α + β, α = 1 + U(±contrast), β = U(±brightness).
    Albumentations' "contrast" is a plain gain, not a stretch about the mean (ColorJitter's is)."""
    if not _coin(g, p):
        return x
    alpha = 1 + _uniform(g, -contrast, contrast)
    beta = _uniform(g, -brightness, brightness)
    return (x * alpha + beta).clamp(0, 1)


def hue_saturation_value(x, g, hue=10.0, sat=20.0, val=20.0, p=1.0):
    """A.HueSaturationValue on uint8 images, whose shifts are in OpenCV's uint8 HSV units: hue on a 0..180 circle
    (so hue=10 turns by up to ±20°), saturation and value on 0..255, clipped."""
    if not _coin(g, p):
        return x
    dh, ds, dv = _uniform(g, -hue, hue), _uniform(g, -sat, sat), _uniform(g, -val, val)
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb((h + dh / 180) % 1, (s + ds / 255).clamp(0, 1), (v + dv / 255).clamp(0, 1))


def color_jitter(x, g, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1, p=1.0):
    """A.ColorJitter (torchvision's definition): factors b, c, s ~ U(1 ± ·), hue turn ~ U(±hue), applied in a random
    order. Contrast blends with the mean gray level, saturation with the gray image."""
    if not _coin(g, p):
        return x
    fb = _uniform(g, max(0.0, 1 - brightness), 1 + brightness)
    fc = _uniform(g, max(0.0, 1 - contrast), 1 + contrast)
    fs = _uniform(g, max(0.0, 1 - saturation), 1 + saturation)
    fh = _uniform(g, -hue, hue)
    steps = [lambda y: y * fb,
             lambda y: y * fc + _gray(y).mean() * (1 - fc),
             lambda y: y * fs + _gray(y) * (1 - fs),
             lambda y: _turn_hue(y, fh)]
    for i in torch.randperm(4, generator=g).tolist():
        x = steps[i](x).clamp(0, 1)
    return x


# ----------------------------------------------------------------------------- noise and blur
def _filter2d(x, kernel):
    """Correlate each channel of x (C, H, W) with kernel (kh, kw), same size out: cv2.filter2D with its default
    BORDER_REFLECT_101, which is F.pad's "reflect" (needs H, W > kernel radius)."""
    kh, kw = kernel.shape
    xp = F.pad(x[None], (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")  # (1, C, H + kh - 1, W + kw - 1)
    weight = kernel.to(x.dtype).expand(x.shape[0], 1, kh, kw)  # one filter per channel (depthwise)
    return F.conv2d(xp, weight, groups=x.shape[0])[0].clamp(0, 1)


def gauss_noise(x, g, var=(10.0, 50.0), p=1.0):
    """A.GaussNoise(var_limit, per_channel=True): add N(0, σ²) per pixel and channel, σ² ~ U(var) on the 0..255
    scale (so σ is 3..7 gray levels)."""
    if not _coin(g, p):
        return x
    sigma = math.sqrt(_uniform(g, *var)) / 255
    return (x + sigma * torch.randn(x.shape, generator=g, dtype=x.dtype)).clamp(0, 1)


def gaussian_blur(x, g, ksize=(3, 5), p=1.0):
    """A.GaussianBlur(blur_limit=(3, 5), sigma_limit=0). Albumentations draws k from {3, 4, 5} and bumps an even k
    up, so k = 5 twice as often as 3. With sigma 0 OpenCV takes its fixed small-kernel table, which for k = 3 and 5
    is the binomial kernel: [1 2 1]/4 and [1 4 6 4 1]/16, applied separably."""
    if not _coin(g, p):
        return x
    k = _randint(g, *ksize)
    k += 1 - k % 2  # even -> next odd
    row = torch.tensor([math.comb(k - 1, i) for i in range(k)], dtype=torch.float64) / 2 ** (k - 1)  # Pascal
    return _filter2d(x, torch.outer(row, row))


def motion_blur(x, g, ksize=(3, 5), p=1.0):
    """A.MotionBlur(blur_limit=5, allow_shifted=True): odd k ~ {3, 5}; a one-pixel line between two random cells of
    a k×k kernel (distinct rows when the columns coincide, so never a single dot), normalised to sum 1.
    The line is rasterised by rounding, which can differ from cv2.line's Bresenham by a cell."""
    if not _coin(g, p):
        return x
    sizes = list(range(ksize[0], ksize[1] + 1, 2))
    k = sizes[_randint(g, 0, len(sizes) - 1)]
    x1, x2 = _randint(g, 0, k - 1), _randint(g, 0, k - 1)
    if x1 == x2:
        y1, y2 = torch.randperm(k, generator=g)[:2].tolist()
    else:
        y1, y2 = _randint(g, 0, k - 1), _randint(g, 0, k - 1)
    n = max(abs(x2 - x1), abs(y2 - y1)) + 1
    kernel = torch.zeros(k, k, dtype=torch.float64)
    kernel[torch.linspace(y1, y2, n).round().long(), torch.linspace(x1, x2, n).round().long()] = 1
    return _filter2d(x, kernel / kernel.sum())


def coarse_dropout(x, g, holes=(1, 8), size=0.1, p=0.2):
    """A.CoarseDropout(min_holes=1, max_holes=8, max_height=max_width=int(0.1·224), fill_value=0): n ~ U{holes}
    black rectangles at uniform positions. min_height defaults to max_height, so every hole has the same size. The
    notebook sized holes for 224 px (22 px) but cut them at the original resolution; here a hole is `size` of each
    side, so the occluded fraction does not depend on the crop's resolution."""
    if not _coin(g, p):
        return x
    _, h, w = x.shape
    hh, ww = max(1, int(size * h)), max(1, int(size * w))
    x = x.clone()
    for _ in range(_randint(g, *holes)):
        y0, x0 = _randint(g, 0, h - hh), _randint(g, 0, w - ww)
        x[:, y0:y0 + hh, x0:x0 + ww] = 0
    return x


def one_of(x, g, transforms, p):
    """A.OneOf: with probability p apply exactly one of `transforms` (each called as t(x, g)), chosen uniformly
    (the children's own p are all equal in the notebook, and OneOf force-applies the chosen one)."""
    if not _coin(g, p):
        return x
    return transforms[_randint(g, 0, len(transforms) - 1)](x, g)


# ----------------------------------------------------------------------------- the pipeline
def augment(x, g, strength="medium"):
    """The notebook's train transform before Resize: x (3, H, W) float in [0, 1] -> same shape and range."""
    if strength not in STRENGTH_NAMES:
        raise ValueError(f"augmentation strength must be one of {STRENGTH_NAMES}, got {strength!r}")
    if strength == "none":
        return x
    s = STRENGTHS[strength]
    h, w = x.shape[1:]
    x = hflip(x, g, p=0.5)
    x = rotate(x, g, limit=s["rotate"], p=0.5)  # reflected border, so it cannot join the warp below
    # ShiftScaleRotate then Perspective as ONE warp: out(q) = src(S⁻¹ P⁻¹ q). Exact up to interpolation, since the
    # perspective quad lies inside the image, so only ShiftScaleRotate's zero border can show. Same draws in the
    # same order as calling shift_scale_rotate() then perspective(), one bilinear resampling fewer.
    m = _shift_scale_rotate_matrix(g, h, w, 0.1, s["scale"], s["rotate"]) if _coin(g, 0.5) else None
    if _coin(g, 0.3):
        pm = _perspective_matrix(g, h, w, (0.05, 0.1))
        m = pm if m is None else m @ pm
    if m is not None:
        x = _warp(x, m, "zeros")
    bc = dict(brightness=s["brightness"], contrast=s["contrast"])
    x = one_of(x, g, [partial(brightness_contrast, **bc), hue_saturation_value, partial(color_jitter, **bc)], p=0.8)
    x = one_of(x, g, [gauss_noise, gaussian_blur, motion_blur], p=0.3)
    return coarse_dropout(x, g, p=0.2)


def resize_normalize(x, size=224):
    """DINOv3's preprocessing (docs/DINOV3.md ("Preprocessing")), the last step for every split: squash (3, H, W) in [0, 1] to
    size × size with antialiased bilinear (torchvision's tensor Resize; PIL's BILINEAR to within rounding), then
    (x - mean) / std with the ImageNet statistics. `size` may be an int or (height, width)."""
    out_hw = (size, size) if isinstance(size, int) else tuple(size)
    x = F.interpolate(x[None], size=out_hw, mode="bilinear", align_corners=False, antialias=True)[0]  # (3, S, S)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std
