"""The synthetic street world behind dcfm.synth: procedural textures, sprites, camera and composition.

All rendering is vectorised numpy on float32 RGB in [0, 1]. Sizes are expressed relative to the output
frame height (`u` = height / 128) so a scene looks alike at any resolution.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field

import numpy as np

CLASSES: tuple[str, ...] = ("sky", "building", "vegetation", "road", "water", "car", "person", "ball")
SKY, BUILDING, VEGETATION, ROAD, WATER, CAR, PERSON, BALL = range(len(CLASSES))
PALETTE: tuple[tuple[int, int, int], ...] = (
    (70, 130, 180), (70, 70, 70), (107, 142, 35), (128, 64, 128),
    (0, 80, 160), (0, 0, 142), (220, 20, 60), (250, 170, 30),
)

_S_MIN, _S_MAX = 0.85, 1.25  # camera zoom range: canvas pixels per output pixel
_NOISE_PAD = 32  # the sensor-noise bank is this much larger than a frame, for per-frame offsets


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), np.float32)


def _noise(rng: np.random.Generator, h: int, w: int, cell_y: float, cell_x: float | None = None) -> np.ndarray:
    """Smooth value noise in [0, 1]: a random lattice with the given cell size, smoothstep-interpolated."""
    cell_x = cell_y if cell_x is None else cell_x
    cell_y, cell_x = max(cell_y, 1.0), max(cell_x, 1.0)
    grid = rng.random((int(h / cell_y) + 2, int(w / cell_x) + 2), dtype=np.float32)
    y = np.arange(h, dtype=np.float32) / cell_y
    x = np.arange(w, dtype=np.float32) / cell_x
    y0, x0 = y.astype(np.intp), x.astype(np.intp)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    a, b = grid[np.ix_(y0, x0)], grid[np.ix_(y0, x0 + 1)]
    c, d = grid[np.ix_(y0 + 1, x0)], grid[np.ix_(y0 + 1, x0 + 1)]
    return a + (b - a) * fx + (c - a) * fy + (a - b - c + d) * fx * fy


def _fbm(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 4, aspect: float = 1.0) -> np.ndarray:
    """Fractal noise, roughly in [-1, 1]; aspect > 1 stretches features horizontally."""
    total = np.zeros((h, w), np.float32)
    amp, norm = 1.0, 0.0
    for o in range(octaves):
        c = cell / 2**o
        total += amp * (_noise(rng, h, w, c, c * aspect) - 0.5)
        norm += amp
        amp *= 0.5
    return total * (2.0 / norm)


@dataclass
class Sprite:
    """A moving object: pose images (all the same size), mask, and its motion in canvas coordinates."""

    cls: int
    rgbs: list[np.ndarray]
    masks: list[np.ndarray]
    ground_y: float  # canvas row of its bottom edge; larger = nearer the camera = drawn later
    x0: float
    vx: float
    span: tuple[float, float]  # wraps around in x over this range so long videos keep their objects
    bounce_amp: float = 0.0
    bounce_period: float = 1.0
    bounce_phase: float = 0.0
    pose_period: int = 4

    def place(self, t: float) -> tuple[int, int, int]:
        """(top row, left column, pose index) at world time t."""
        h, w = self.masks[0].shape
        lo, hi = self.span
        x = lo + (self.x0 + self.vx * t - lo) % (hi - lo)
        bottom = self.ground_y - self.bounce_amp * abs(math.sin(math.pi * t / self.bounce_period + self.bounce_phase))
        pose = int(t // self.pose_period) % len(self.rgbs)
        return int(math.floor(bottom)) - h, int(math.floor(x)), pose


def _car(rng: np.random.Generator, width: int, facing_right: bool) -> tuple[np.ndarray, np.ndarray]:
    w = max(width, 12)
    h = max(int(w * rng.uniform(0.38, 0.48)), 6)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yn, xn = (yy + 0.5) / h, (xx + 0.5) / w
    body = (yn >= 0.4) & (yn <= 0.85)
    slope = np.clip((0.42 - yn) / 0.37, 0, 1)
    cabin = (yn >= 0.05) & (yn < 0.42) & (xn > 0.18 + 0.12 * slope) & (xn < 0.8 - 0.08 * slope)
    window = cabin & (yn > 0.12) & (yn < 0.38) & (xn > 0.24 + 0.12 * slope) & (xn < 0.75 - 0.08 * slope)
    window &= np.abs(xn - 0.5) > 0.02
    r = 0.17 * h
    wheel_d = np.minimum(np.hypot(yy - 0.82 * h, xx - 0.2 * w), np.hypot(yy - 0.82 * h, xx - 0.8 * w))
    wheel = wheel_d < r
    if rng.random() < 0.3:  # white/grey/black cars: by colour they could be road or building
        paint = _hsv(rng.random(), rng.uniform(0, 0.08), rng.uniform(0.1, 0.95))
    else:
        paint = _hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.3, 0.9))
    shade = (0.75 + 0.35 * (1 - yn) + 0.2 * np.exp(-(((yn - 0.5) / 0.04) ** 2)))[..., None]
    rgb = paint * shade
    glass = _hsv(rng.uniform(0.5, 0.65), 0.3, rng.uniform(0.15, 0.35)) * (0.8 + 0.5 * ((xn + yn) % 0.3 < 0.06))[..., None]
    rgb = np.where(window[..., None], glass, rgb)
    tyre = np.where((wheel_d < 0.45 * r)[..., None], np.float32(0.55), np.float32(0.06))
    rgb = np.where(wheel[..., None], tyre, rgb)
    lights = body & (yn > 0.45) & (yn < 0.56)
    rgb = np.where((lights & (xn > 0.96))[..., None], _hsv(0.15, 0.3, 1.0), rgb)
    rgb = np.where((lights & (xn < 0.03))[..., None], _hsv(0.0, 0.9, 0.8), rgb)
    mask = body | cabin | wheel
    if not facing_right:
        rgb, mask = rgb[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(rgb, np.float32), np.ascontiguousarray(mask)


def _person(rng: np.random.Generator, height: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    h = max(height, 12)
    w = max(int(0.42 * h), 5)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yn, dx = (yy + 0.5) / h, (xx + 0.5 - w / 2) / h  # dx in units of height, so the figure isn't squashed
    skin = _hsv(rng.uniform(0.03, 0.1), rng.uniform(0.2, 0.6), rng.uniform(0.35, 0.95))
    shirt = _hsv(rng.random(), rng.uniform(0.2, 0.9), rng.uniform(0.3, 0.95))
    shirt2 = _hsv(rng.random(), rng.uniform(0.2, 0.9), rng.uniform(0.2, 0.9))
    pants = _hsv(rng.random(), rng.uniform(0.1, 0.6), rng.uniform(0.1, 0.5))
    hair = _hsv(rng.uniform(0.0, 0.12), rng.uniform(0.2, 0.7), rng.uniform(0.05, 0.5))
    stripe = max(int(h * rng.uniform(0.03, 0.06)), 1)
    head = np.hypot(yn - 0.09, dx) < 0.075
    torso = (yn >= 0.17) & (yn < 0.56) & (np.abs(dx) < 0.085)
    arms = (yn >= 0.19) & (yn < 0.5) & (np.abs(dx) >= 0.085) & (np.abs(dx) < 0.12)
    hands = (yn >= 0.5) & (yn < 0.55) & (np.abs(dx) >= 0.09) & (np.abs(dx) < 0.12)
    top = np.where((((yy // stripe) % 2 == 0) | (rng.random() < 0.5))[..., None], shirt, shirt2)
    rgbs, masks = [], []
    for spread in (0.0, 0.06):  # two walking poses: legs together / apart
        off = 0.035 + spread * np.clip((yn - 0.56) / 0.44, 0, 1)
        legs = (yn >= 0.56) & ((np.abs(dx - off) < 0.03) | (np.abs(dx + off) < 0.03))
        rgb = np.zeros((h, w, 3), np.float32)
        rgb = np.where((torso | arms)[..., None], top, rgb)
        rgb = np.where(legs[..., None], pants, rgb)
        rgb = np.where((head | hands)[..., None], skin, rgb)
        rgb = np.where((head & (yn < 0.07))[..., None], hair, rgb)
        rgb *= (0.85 + 0.25 * np.clip(0.5 - dx * 4, 0, 1))[..., None]  # side light
        rgbs.append(rgb)
        masks.append(head | torso | arms | hands | legs)
    return rgbs, masks


def _ball(rng: np.random.Generator, diameter: int) -> tuple[np.ndarray, np.ndarray]:
    d = max(diameter, 5)
    yy, xx = np.mgrid[0:d, 0:d].astype(np.float32)
    cy = cx = d / 2
    rr = np.hypot(yy + 0.5 - cy, xx + 0.5 - cx) / (d / 2)
    ang = np.arctan2(yy + 0.5 - cy, xx + 0.5 - cx)
    a, b = _hsv(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0)), _hsv(rng.random(), rng.uniform(0, 1), 0.95)
    panels = ((np.floor(ang / (np.pi / 3) + rng.random()) + np.floor(rr * 2)) % 2 == 0)[..., None]
    light = np.hypot(yy + 0.5 - 0.7 * cy, xx + 0.5 - 0.7 * cx) / d
    rgb = np.where(panels, a, b) * (1.15 - 0.9 * light)[..., None]
    return rgb.astype(np.float32), rr <= 1.0


@dataclass
class Scene:
    """One video's world: a static background canvas, sprites, a camera path and a lighting path."""

    height: int
    width: int
    bg_rgb: np.ndarray
    bg_label: np.ndarray
    water_wave: tuple[np.ndarray, np.ndarray]  # ripple amplitude x (sin, cos) of the phase; 0 off water
    sprites: list[Sprite]
    cam: np.ndarray  # (9,) amplitude/period/phase for x, y and zoom
    light: np.ndarray  # (3,) per-channel cast
    light_wave: tuple[float, float, float]  # amplitude, period, phase of the global gain drift
    noise_seed: int
    motion: float = 1.0  # world time advanced per frame
    _noise_bank: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Sensor noise: one bank per video, cropped at a per-frame random offset (fresh noise per frame
        # costs more than the rest of the render).
        bank_rng = np.random.default_rng([self.noise_seed, 2**31])
        shape = (self.height + _NOISE_PAD, self.width + _NOISE_PAD, 3)
        self._noise_bank = bank_rng.standard_normal(shape, dtype=np.float32) * np.float32(0.008)

    def camera(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Canvas row and column indices sampled by each output row/column at world time t."""
        hc, wc = self.bg_label.shape
        ax, px, fx, ay, py, fy, az, pz, fz = self.cam
        s = (_S_MIN + _S_MAX) / 2 + az * math.sin(2 * math.pi * t / pz + fz)
        cx = wc / 2 + ax * math.sin(2 * math.pi * t / px + fx)
        cy = hc / 2 + ay * math.sin(2 * math.pi * t / py + fy)
        ys = np.floor(cy + (np.arange(self.height) + 0.5 - self.height / 2) * s).astype(np.intp)
        xs = np.floor(cx + (np.arange(self.width) + 0.5 - self.width / 2) * s).astype(np.intp)
        return np.clip(ys, 0, hc - 1), np.clip(xs, 0, wc - 1)

    def render(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(rgb uint8 HxWx3, label uint8 HxW) of frame t; any t, in any order."""
        frame_rng = np.random.default_rng([self.noise_seed, t])
        t = t * self.motion  # from here on, world time
        ys, xs = self.camera(t)
        grid = (ys[:, None], xs[None, :])
        img = self.bg_rgb[grid]
        label = self.bg_label[grid]
        # Ripples travel (sin(phase - w t) expanded), so water's texture changes over time.
        ws, wc = self.water_wave
        img *= (1 + ws[grid] * np.float32(math.cos(0.5 * t)) - wc[grid] * np.float32(math.sin(0.5 * t)))[..., None]
        for sp in sorted(self.sprites, key=lambda s: s.ground_y):  # far to near: painter's algorithm
            top, left, pose = sp.place(t)
            mask = sp.masks[pose]
            sy, sx = ys - top, xs - left
            ri = np.nonzero((sy >= 0) & (sy < mask.shape[0]))[0]
            ci = np.nonzero((sx >= 0) & (sx < mask.shape[1]))[0]
            if ri.size == 0 or ci.size == 0:
                continue
            # ys and xs are monotonic, so the in-bounds rows/columns form one contiguous block.
            sub = np.ix_(sy[ri], sx[ci])
            m = mask[sub]
            block = (slice(ri[0], ri[-1] + 1), slice(ci[0], ci[-1] + 1))
            np.copyto(img[block], sp.rgbs[pose][sub], where=m[..., None])
            label[block][m] = sp.cls
        amp, period, phase = self.light_wave
        gain = 1 + amp * math.sin(2 * math.pi * t / period + phase) + 0.01 * frame_rng.standard_normal()
        img *= self.light * np.float32(gain)
        oy, ox = frame_rng.integers(0, _NOISE_PAD + 1, 2)
        img += self._noise_bank[oy:oy + self.height, ox:ox + self.width]
        rgb = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
        return rgb, label


def _background(
    rng: np.random.Generator, hc: int, wc: int, u: float, bands: dict[str, int], water_far: bool
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Paint the static canvas; returns (rgb, label, ripple (sin, cos) maps, zero off water)."""
    y_h, y_a, y_r = bands["horizon"], bands["far"], bands["road"]
    yy = np.arange(hc, dtype=np.float32)[:, None]
    xx = np.arange(wc, dtype=np.float32)[None, :]
    rgb = np.zeros((hc, wc, 3), np.float32)
    label = np.zeros((hc, wc), np.uint8)

    # Sky: vertical gradient plus soft clouds; sometimes overcast grey, which competes with road/concrete.
    overcast = rng.random() < 0.25
    hue, sat = rng.uniform(0.52, 0.66), rng.uniform(0.35, 0.8) * (0.15 if overcast else 1.0)
    zenith, horizon = _hsv(hue, sat, rng.uniform(0.55, 0.85)), _hsv(hue, sat * 0.4, rng.uniform(0.8, 0.98))
    g = np.clip(yy / max(y_h, 1), 0, 1)[..., None]
    sky = zenith * (1 - g) + horizon * g
    cloud = np.clip((_fbm(rng, hc, wc, 20 * u, 4, aspect=2.5) - rng.uniform(0.0, 0.35)) / 0.3, 0, 1)[..., None]
    rgb[:] = sky * (1 - cloud) + _hsv(0, 0, rng.uniform(0.8, 1.0)) * cloud
    label[:] = SKY

    # Buildings along the horizon, each its own facade: bricks or a window grid.
    x = 0.0
    while x < wc:
        bw = rng.uniform(0.08, 0.3) * wc / 2.8
        if rng.random() < 0.25:  # a gap that shows sky down to the horizon
            x += bw * 0.5
            continue
        x0, x1 = int(x), min(int(x + bw), wc)
        top = int(y_h - rng.uniform(0.2, 0.7) * y_h)
        by, bx = yy[top:y_h] - top, xx[:, x0:x1] - x0
        grain = 0.9 + 0.1 * _noise(rng, y_h - top, x1 - x0, 1.0)[..., None]
        if rng.random() < 0.5:
            base = _hsv(rng.uniform(0.0, 0.09), rng.uniform(0.3, 0.7), rng.uniform(0.35, 0.7))
            bh, bl = max(3.0 * u, 2), max(7.0 * u, 4)
            mortar = (by % bh < max(u, 1)) | ((bx + (by // bh % 2) * bl / 2) % bl < max(u, 1))
            face = np.where(mortar[..., None], _hsv(0, 0, rng.uniform(0.55, 0.8)), base * grain)
        else:
            base = _hsv(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.45, 0.85))
            wy, wx = rng.uniform(6, 10) * u, rng.uniform(6, 12) * u
            win = ((by - 2 * u) % wy < wy * 0.55) & ((bx - 2 * u) % wx < wx * 0.55)
            sheen = 1 + 0.4 * ((bx + by) % (9 * u)) / (9 * u)  # diagonal reflection across each pane
            glass = _hsv(rng.uniform(0.5, 0.65), 0.35, rng.uniform(0.1, 0.35)) * sheen[..., None]
            face = np.where(win[..., None], glass, base * grain)
        rgb[top:y_h, x0:x1] = face
        label[top:y_h, x0:x1] = BUILDING
        x += bw

    # Vegetation texture, shared by trees on the horizon and the grass band.
    green = _hsv(rng.uniform(0.05, 0.12) if rng.random() < 0.2 else rng.uniform(0.17, 0.38),
                 rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.6))
    leaves = 0.55 + 0.35 * _noise(rng, hc, wc, 1.5 * u) + 0.25 * _fbm(rng, hc, wc, 6 * u, 3)
    veg = green * leaves[..., None]
    blob = _fbm(rng, hc, wc, 5 * u, 3)
    trees = np.zeros((hc, wc), bool)
    for _ in range(int(rng.integers(3, 9) * wc / 700) + 1):
        cx, rx = rng.uniform(0, wc), rng.uniform(10, 26) * u
        cy, ry = y_h - rng.uniform(0.0, 0.5) * rx, rx * rng.uniform(0.8, 1.4)
        trees |= ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1 + 0.6 * blob
    trees[y_h:] = False
    rgb[trees], label[trees] = veg[trees], VEGETATION

    # Ground bands: [far: water or grass] [road] [near: the other one].
    grass = veg * (0.8 + 0.3 * _noise(rng, hc, wc, 4 * u, 0.7 * u))[..., None]  # vertical blade streaks
    water_col = _hsv(rng.uniform(0.45, 0.64), rng.uniform(0.25, 0.7), rng.uniform(0.3, 0.65))
    water_phase = (yy * rng.uniform(0.6, 1.2) / u + 3.0 * _fbm(rng, hc, wc, 10 * u, 3, aspect=3)).astype(np.float32)
    water = water_col * (1 + 0.1 * np.sin(1.7 * water_phase))[..., None]
    far, near = (slice(y_h, y_a), slice(y_r, hc))
    for rows, is_water in ((far, water_far), (near, not water_far)):
        rgb[rows] = water[rows] if is_water else grass[rows]
        label[rows] = WATER if is_water else VEGETATION
    asphalt = _hsv(rng.random(), rng.uniform(0, 0.15), rng.uniform(0.2, 0.5))
    road = asphalt * (0.85 + 0.2 * _noise(rng, hc, wc, 1.0) + 0.1 * _fbm(rng, hc, wc, 12 * u, 2))[..., None]
    mid, lw, dash = (y_a + y_r) / 2, max(0.8 * u, 1.0), rng.uniform(12, 24) * u
    paint = _hsv(0.14, 0.8, 0.9) if rng.random() < 0.4 else _hsv(0, 0, 0.92)
    lines = ((np.abs(yy + 0.5 - mid) < lw) & (xx % dash < dash / 2)) | (np.abs(yy + 0.5 - y_a - 1.5 * lw) < lw)
    road = np.where(lines[..., None], paint, road)
    rgb[y_a:y_r], label[y_a:y_r] = road[y_a:y_r], ROAD
    on_water = np.float32(0.12) * (label == WATER)
    return rgb, label, (np.sin(water_phase) * on_water, np.cos(water_phase) * on_water)


def build_scene(rng: np.random.Generator, height: int, width: int, motion: float = 1.0) -> Scene:
    """Draw one random scene for output frames of height x width, moving `motion` times the default speed."""
    u = height / 128
    cam_ax, cam_ay = rng.uniform(0.15, 0.35) * width, 0.03 * height
    hc = int(math.ceil(height * _S_MAX + 2 * cam_ay)) + 4
    wc = int(math.ceil(width * _S_MAX + 2 * cam_ax)) + 4
    y_h = int(hc * rng.uniform(0.3, 0.4))
    y_a = y_h + int(hc * rng.uniform(0.1, 0.14))
    y_r = y_a + int(hc * rng.uniform(0.18, 0.24))
    water_far = bool(rng.random() < 0.5)
    bg_rgb, bg_label, water_wave = _background(rng, hc, wc, u, {"horizon": y_h, "far": y_a, "road": y_r}, water_far)

    def perspective(ground_y: float) -> float:
        return 0.6 + 0.8 * (ground_y - y_h) / (hc - y_h)

    # Walkers stay off the water: on the near grass, or on the road's near edge when the near band is water.
    walk_lo, walk_hi = (y_r + 0.1 * (hc - y_r), y_r + 0.45 * (hc - y_r)) if water_far else (y_r - 0.15 * (y_r - y_a), y_r)
    cam = np.array([
        cam_ax, rng.uniform(80, 160), rng.uniform(0, 2 * math.pi),
        cam_ay, rng.uniform(40, 90), rng.uniform(0, 2 * math.pi),
        (_S_MAX - _S_MIN) / 2 * rng.uniform(0.5, 1.0), rng.uniform(60, 140), rng.uniform(0, 2 * math.pi),
    ])
    cx0 = wc / 2 + cam_ax * math.sin(cam[2])
    view0 = (cx0 - width * _S_MIN / 2, cx0 + width * _S_MIN / 2)
    sprites: list[Sprite] = []
    flip_lanes = rng.random() < 0.5
    for kind, count in ((CAR, rng.integers(2, 5)), (PERSON, rng.integers(2, 5)), (BALL, rng.integers(1, 3))):
        for j in range(int(count)):
            sp: Sprite
            if kind == CAR:
                near_lane = rng.random() < 0.5
                gy = y_a + (y_r - y_a) * ((0.93 if near_lane else 0.48) + rng.uniform(-0.03, 0.03))
                vx = rng.uniform(1.0, 3.0) * u * (1 if near_lane != flip_lanes else -1)
                rgb, mask = _car(rng, int(rng.uniform(0.16, 0.24) * width * perspective(gy)), vx > 0)
                sp = Sprite(CAR, [rgb], [mask], gy, 0.0, vx, (0.0, 1.0))
            elif kind == PERSON:
                gy = rng.uniform(walk_lo, walk_hi)
                rgbs, masks = _person(rng, int(rng.uniform(0.22, 0.3) * height * perspective(gy)))
                vx = rng.uniform(0.3, 1.0) * u * rng.choice([-1, 1])
                sp = Sprite(PERSON, rgbs, masks, gy, 0.0, vx, (0.0, 1.0), pose_period=int(rng.integers(3, 6)))
            else:
                gy = rng.uniform(walk_lo, walk_hi)
                rgb, mask = _ball(rng, int(rng.uniform(0.06, 0.1) * height * perspective(gy)))
                vx = rng.uniform(0.8, 2.0) * u * rng.choice([-1, 1])
                sp = Sprite(BALL, [rgb], [mask], gy, 0.0, vx, (0.0, 1.0), rng.uniform(0.1, 0.25) * height,
                            rng.uniform(12, 24), rng.uniform(0, math.pi))
            sw = sp.masks[0].shape[1]
            # Wrap just outside the canvas, so objects pop in and out where the camera never looks.
            sp.span = (-float(sw), float(wc))
            # The first object of each kind starts inside the opening view so every class is on screen early.
            lo, hi = (view0[0], view0[1] - sw) if j == 0 else (-sw, wc)
            sp.x0 = float(rng.uniform(lo, max(hi, lo + 1)))
            sprites.append(sp)
    light = rng.uniform(0.8, 1.15) * rng.uniform(0.92, 1.08, 3).astype(np.float32)
    return Scene(height, width, bg_rgb, bg_label, water_wave, sprites, cam, light.astype(np.float32),
                 (rng.uniform(0.02, 0.06), rng.uniform(30, 90), rng.uniform(0, 2 * math.pi)),
                 int(rng.integers(2**31)), motion)
