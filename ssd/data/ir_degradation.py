"""How the infrared sample's frames are degraded (:func:`schedule`, :func:`occluder_bands`,
:func:`degrade`): noise, occlusion, washout, dark, garbage and frozen frames, in short runs
between clean stretches, the cases a temporal detector's memory is there for.

Each function draws from the video's generator in a fixed order, so a video is a function of
``(seed, index)`` (:mod:`ssd.data.synthetic_ir`).
"""

from __future__ import annotations

import numpy as np

from ssd.data.synthetic_common import _smooth_noise

# Degradation events: (weight, shortest, longest run of frames).
EVENTS = {
    "noise": (0.28, 2, 4),
    "occlusion": (0.24, 2, 5),
    "washout": (0.24, 2, 4),
    "dark": (0.10, 1, 2),
    "garbage": (0.09, 1, 2),
    "frozen": (0.05, 1, 3),
}
CLEAN_HEAD = 3  # clean frames at the start of a video, so memory has something to hold
CLEAN_GAP = 2  # clean frames between two degradation events


def schedule(rng, T: int, share: float) -> list[str]:
    """Which frames are degraded and how: exactly ``round(share * T)`` of them, in short runs."""
    n_bad = int(round(share * T))
    if n_bad <= 0:
        return [""] * T
    kinds = list(EVENTS)
    weights = np.array([EVENTS[k][0] for k in kinds])
    events: list[tuple[str, int]] = []
    left = n_bad
    while left > 0:
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        length = min(int(rng.integers(EVENTS[kind][1], EVENTS[kind][2] + 1)), left)
        events.append((kind, length))
        left -= length
    clean = T - n_bad
    head, gap = CLEAN_HEAD, CLEAN_GAP
    while head + gap * (len(events) - 1) > clean:  # a short video: squeeze the clean stretches
        if gap > 1 or (gap == 1 and head <= 1):
            gap -= 1
        else:
            head -= 1
        if gap < 0:
            gap, head = 0, 0
            break
    spare = clean - head - gap * (len(events) - 1)
    # Spread the spare clean frames over the head, the gaps and the tail.
    cuts = np.sort(rng.integers(0, spare + 1, size=len(events)))
    extra = np.diff(np.concatenate([[0], cuts, [spare]]))
    out: list[str] = [""] * (head + int(extra[0]))
    for i, (kind, length) in enumerate(events):
        out += [kind] * length
        out += [""] * ((gap if i < len(events) - 1 else 0) + int(extra[i + 1]))
    return out


def occluder_bands(rng, degradation, drawings, W: int, H: int) -> dict[int, tuple[int, int, np.ndarray]]:
    """For each run of ``occlusion`` frames, a cold full-height band hiding one object throughout.

    Returns ``{frame: (x0, x1, cold float32 [H, >= x1 - x0])}``.
    """
    bands = {}
    t = 0
    while t < len(degradation):
        if degradation[t] != "occlusion":
            t += 1
            continue
        end = t
        while end < len(degradation) and degradation[end] == "occlusion":
            end += 1
        # An object that is in view throughout the run, if any.
        spans = []
        for k in range(len(drawings[t])):
            xs = []
            for u in range(t, end):
                x0, _, _, mask = drawings[u][k]
                cols = np.nonzero(mask.any(axis=0))[0] + x0
                cols = cols[(cols >= 0) & (cols < W)]
                xs.append((cols.min(), cols.max() + 1) if cols.size else None)
            if all(x is not None for x in xs):
                spans.append((min(x[0] for x in xs), max(x[1] for x in xs)))
        if spans:
            lo, hi = spans[int(rng.integers(len(spans)))]
        else:
            lo = int(rng.integers(0, W - 8))
            hi = lo + 8
        b0 = max(0, int(lo) - int(rng.integers(2, 11)))
        b1 = min(W, int(hi) + int(rng.integers(2, 11)))
        level = float(rng.uniform(15, 40))
        cold = level + 4.0 * _smooth_noise(rng, (4, 3), (H, b1 - b0))
        for u in range(t, end):
            bands[u] = (b0, b1, cold)
        t = end
    return bands


def degrade(rng, f: np.ndarray, kind: str) -> np.ndarray:
    """Apply one degradation to a float frame (``""`` and ``"occlusion"``: unchanged)."""
    H, W = f.shape
    if kind == "noise":  # gain drops, blotches of object size, heavy grain, dead pixels
        m = float(f.mean())
        g = float(rng.uniform(0.25, 0.45))
        blotch = _smooth_noise(rng, (max(H // 8, 2), max(W // 8, 2)), (H, W)) * float(rng.uniform(30, 45))
        grain = rng.standard_normal((H, W), np.float32) * float(rng.uniform(45, 70))
        out = m + g * (f - m) + blotch + grain
        out += rng.normal(0, 12, W)
        dead = rng.random((H, W)) < rng.uniform(0.03, 0.07)
        out[dead] = rng.choice(np.array([0.0, 255.0]), size=int(dead.sum()))
        return out
    if kind == "washout":  # contrast collapsed around a bright level
        c = float(rng.uniform(0.02, 0.06))
        blotch = _smooth_noise(rng, (max(H // 10, 2), max(W // 10, 2)), (H, W)) * float(rng.uniform(2, 5))
        grain = rng.standard_normal((H, W), np.float32) * float(rng.uniform(2, 4))
        level = float(rng.uniform(150, 230))
        return level + c * (f - float(f.mean())) + blotch + grain
    if kind == "dark" or kind == "frozen":  # frozen with nothing to repeat: a dark frame
        return float(rng.uniform(2, 12)) + rng.normal(0, 1.5, (H, W))
    if kind == "garbage":  # a decoder's blocks and streaks
        block = int(rng.choice([4, 8, 16]))
        blocks = rng.uniform(0, 255, (H // block + 1, W // block + 1)).astype(np.float32)
        out = np.kron(blocks, np.ones((block, block), np.float32))[:H, :W].copy()
        rows = rng.random(H) < 0.15
        out[rows] = rng.uniform(0, 255, (int(rows.sum()), 1))
        return out
    return f
