"""Poisoned and clean weekly batches for ``bench/poison.py``: pure numpy, no I/O.

Every generator takes a batch (``images``: uint8 ``(n, 28, 28)``, ``labels``: uint8 ``(n,)``) and returns a
new one; the inputs are never modified. :func:`battery` lists the attacks of issue 24 and splits them, before
any threshold is tuned, into a ``tune`` half and a ``held_out`` half whose trigger shapes, trigger positions
and classes are disjoint (label noise and the earlier poisons name no shape, position or class: both halves
hold every share of them, drawn with their own seeds). :func:`clean_battery` lists the clean batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

SIDE = 28  # MNIST images are SIDE x SIDE
CLASSES = 10
MARGIN = 1  # pixels between a trigger and the image border
HALVES = ("tune", "held_out")
SPLIT_SEED = 24  # issue 24: the split is fixed before anything is tuned

TRIGGER_SHAPES = ("square", "cross", "corner", "checkerboard", "hline", "diagonal")
TRIGGER_POSITIONS = ("top_left", "top_right", "bottom_left", "bottom_right", "top_edge", "bottom_edge",
                     "left_edge", "right_edge", "near_centre")
TRIGGER_SIZES = (2, 3, 4, 5)
TRIGGER_SHARES = (0.01, 0.03, 0.05, 0.10)
FLIP_SHARES = (0.25, 0.50)  # of the source class
SWAP_SHARES = (0.50, 1.0)  # of each of the two classes
NOISE_SHARES = (0.05, 0.10, 0.20, 0.30)
EARLIER_POISONS = ("shuffled", "single_class", "inverted", "copy")
KINDS = ("trigger", "flip", "swap", "noise", "earlier")


# ---------------------------------------------------------------- trigger patterns


def pattern_mask(shape: str, size: int) -> np.ndarray:
    """The ``size`` x ``size`` boolean footprint of a trigger ``shape`` (True: the pixel is stamped white)."""
    rows, cols = np.indices((size, size))
    middle = size // 2
    masks = {
        "square": np.ones((size, size), bool),
        "cross": (rows == middle) | (cols == middle),
        "corner": (cols == 0) | (rows == size - 1),  # an L
        "checkerboard": (rows + cols) % 2 == 0,
        "hline": rows == middle,
        "diagonal": rows == cols,
    }
    if shape not in masks:
        raise ValueError(f"unknown trigger shape {shape!r}; known: {sorted(masks)}")
    return masks[shape]


def pattern_origin(position: str, size: int) -> tuple[int, int]:
    """Row and column of the top-left pixel of a ``size``-pixel trigger at a named ``position``."""
    far, centre = SIDE - MARGIN - size, (SIDE - size) // 2
    origins = {
        "top_left": (MARGIN, MARGIN), "top_right": (MARGIN, far), "bottom_left": (far, MARGIN),
        "bottom_right": (far, far), "top_edge": (MARGIN, centre), "bottom_edge": (far, centre),
        "left_edge": (centre, MARGIN), "right_edge": (centre, far),
        "near_centre": (centre - 4, centre + 4),  # a few pixels up and right of the centre, inside the strokes
    }
    if position not in origins:
        raise ValueError(f"unknown trigger position {position!r}; known: {sorted(origins)}")
    return origins[position]


def stamp(images: np.ndarray, shape: str, size: int, position: str) -> np.ndarray:
    """A copy of ``images`` with the trigger's footprint set to white (255) in every image."""
    stamped = images.copy()
    row, col = pattern_origin(position, size)
    window = stamped[:, row:row + size, col:col + size]
    window[:, pattern_mask(shape, size)] = 255
    return stamped


# ---------------------------------------------------------------- attacks on one batch


def chosen(candidates: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """``round(share * len(candidates))`` of the candidate indices, drawn without replacement."""
    return rng.choice(candidates, size=round(share * len(candidates)), replace=False)


def trigger_attack(images: np.ndarray, labels: np.ndarray, shape: str, size: int, position: str, target: int,
                   share: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A backdoor: ``share`` of the batch (drawn from images not of ``target``) stamped and relabelled ``target``."""
    poisoned = rng.choice(np.flatnonzero(labels != target), size=round(share * len(labels)), replace=False)
    images, labels = images.copy(), labels.copy()
    images[poisoned] = stamp(images[poisoned], shape, size, position)
    labels[poisoned] = target
    return images, labels


def flip_labels(labels: np.ndarray, source: int, target: int, share: float, rng: np.random.Generator) -> np.ndarray:
    """``share`` of the images labelled ``source`` relabelled ``target``."""
    flipped = labels.copy()
    flipped[chosen(np.flatnonzero(labels == source), share, rng)] = target
    return flipped


def swap_labels(labels: np.ndarray, first: int, second: int, share: float, rng: np.random.Generator) -> np.ndarray:
    """A two-way swap: ``share`` of class ``first`` labelled ``second`` and ``share`` of ``second`` labelled ``first``."""
    swapped = labels.copy()
    swapped[chosen(np.flatnonzero(labels == first), share, rng)] = second
    swapped[chosen(np.flatnonzero(labels == second), share, rng)] = first
    return swapped


def uniform_noise(labels: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """``share`` of the labels replaced by another class drawn uniformly (so exactly that share is wrong)."""
    noisy = labels.copy()
    replaced = chosen(np.arange(len(labels)), share, rng)
    # adding 1..9 modulo 10 never gives the old label back, and every other class is equally likely
    noisy[replaced] = (labels[replaced] + rng.integers(1, CLASSES, size=len(replaced))) % CLASSES
    return noisy


# ---------------------------------------------------------------- natural variations of clean data


def shifted(images: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Every image moved by (dx, dy) pixels (right, down), the uncovered border black."""
    moved = np.zeros_like(images)
    rows, cols = images.shape[1:]
    moved[:, max(dy, 0):rows + min(dy, 0), max(dx, 0):cols + min(dx, 0)] = \
        images[:, max(-dy, 0):rows + min(-dy, 0), max(-dx, 0):cols + min(-dx, 0)]
    return moved


def scaled_grey(images: np.ndarray, factor: float) -> np.ndarray:
    """Grey levels multiplied by ``factor`` (a scanner's gain), rounded and clipped to 0..255."""
    return np.clip(np.rint(images.astype(np.float32) * factor), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- the batteries


@dataclasses.dataclass(frozen=True)
class Attack:
    """One poisoned weekly batch: a ``kind`` of :data:`KINDS`, its ``share`` and its settings.

    ``settings`` by kind: trigger ``shape, size, position, target``; flip ``source, target``; swap
    ``first, second``; earlier ``poison`` (one of :data:`EARLIER_POISONS`) and ``label`` for single_class.
    """

    kind: str
    share: float
    seed: int
    settings: tuple[tuple[str, Any], ...]

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.settings)

    @property
    def name(self) -> str:
        values = "-".join(str(value) for _, value in self.settings)
        return f"{self.kind}-{values}-{self.share:g}" if values else f"{self.kind}-{self.share:g}"

    def attacked_class(self) -> int | None:
        """The class whose recall the attack harms (flip: the source; swap: the first of the two), None for the
        kinds measured otherwise (triggers by their success rate, noise and the earlier poisons by accuracy)."""
        options = self.options
        return options.get("source", options.get("first"))

    def apply(self, images: np.ndarray, labels: np.ndarray,
              earlier: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The poisoned batch made from the clean ``images``, ``labels`` (``earlier``: a batch already in the
        history, which the ``copy`` poison lands again)."""
        rng, options = np.random.default_rng(self.seed), self.options
        if self.kind == "trigger":
            return trigger_attack(images, labels, rng=rng, share=self.share, **options)
        if self.kind == "flip":
            return images, flip_labels(labels, options["source"], options["target"], self.share, rng)
        if self.kind == "swap":
            return images, swap_labels(labels, options["first"], options["second"], self.share, rng)
        if self.kind == "noise":
            return images, uniform_noise(labels, self.share, rng)
        poison = options["poison"]
        if poison == "shuffled":
            return images, rng.permutation(labels)
        if poison == "single_class":
            return images, np.full_like(labels, options["label"])
        if poison == "inverted":
            return 255 - images, labels
        if poison == "copy":
            if earlier is None:
                raise ValueError("the copy poison needs the earlier batch it copies")
            return earlier
        raise ValueError(f"unknown attack {self.kind}/{poison}")


def split(values: tuple, rng: np.random.Generator) -> dict[str, tuple]:
    """``values`` shuffled and cut into two disjoint halves (the first half one longer when odd)."""
    order = [values[index] for index in rng.permutation(len(values))]
    cut = (len(values) + 1) // 2
    return {"tune": tuple(order[:cut]), "held_out": tuple(order[cut:])}


def battery_split(seed: int = SPLIT_SEED) -> dict[str, dict[str, tuple]]:
    """Per half: its trigger shapes, trigger positions and classes (disjoint between the halves)."""
    rng = np.random.default_rng(seed)
    shapes, positions, classes = (split(values, rng) for values in
                                  (TRIGGER_SHAPES, TRIGGER_POSITIONS, tuple(range(CLASSES))))
    return {half: {"shapes": shapes[half], "positions": positions[half], "classes": classes[half]}
            for half in HALVES}


def round_robin(groups: list[list[Attack]]) -> list[Attack]:
    """The attacks of ``groups`` interleaved (first of each group, then second, ...), so that the first few
    attacks of a kind cover all its shares."""
    longest = max((len(group) for group in groups), default=0)
    return [group[index] for index in range(longest) for group in groups if index < len(group)]


def battery(half: str, seed: int = SPLIT_SEED) -> dict[str, list[Attack]]:
    """The attacks of one half, by kind; each kind ordered so that its first attacks cover its shares."""
    parts = battery_split(seed)[half]
    shapes, positions, classes = parts["shapes"], parts["positions"], parts["classes"]
    rng = np.random.default_rng([seed, HALVES.index(half)])
    pairs = [(a, b) for a in classes for b in classes if a != b]
    pair_order = [pairs[index] for index in rng.permutation(len(pairs))]

    def seed_of() -> int:
        return int(rng.integers(2**31))

    triggers = [[Attack("trigger", share, seed_of(), (
        ("shape", shape), ("size", int(TRIGGER_SIZES[(i + j) % len(TRIGGER_SIZES)])),
        ("position", positions[(i + j) % len(positions)]), ("target", int(classes[(i + 2 * j) % len(classes)]))))
        for j, shape in enumerate(shapes[i % len(shapes):] + shapes[:i % len(shapes)])]
        for i, share in enumerate(TRIGGER_SHARES)]
    flips = [[Attack("flip", share, seed_of(), (("source", int(a)), ("target", int(b)))) for a, b in pair_order[:4]]
             for share in FLIP_SHARES]
    swaps = [[Attack("swap", share, seed_of(), (("first", int(a)), ("second", int(b)))) for a, b in pair_order[4:6]]
             for share in SWAP_SHARES]
    noise = [[Attack("noise", share, seed_of(), ())] for share in NOISE_SHARES]
    earlier = [[Attack("earlier", 1.0, seed_of(), (("poison", poison),) +
                       ((("label", int(classes[0])),) if poison == "single_class" else ()))]
               for poison in EARLIER_POISONS]
    return {"trigger": round_robin(triggers), "flip": round_robin(flips), "swap": round_robin(swaps),
            "noise": round_robin(noise), "earlier": round_robin(earlier)}


@dataclasses.dataclass(frozen=True)
class CleanBatch:
    """One clean weekly batch: ``count`` images from ``start`` of the ``source`` dataset's training images (its
    own base history and model), moved by ``shift`` pixels and their grey levels scaled by ``grey``."""

    source: str
    start: int
    count: int
    shift: tuple[int, int] = (0, 0)
    grey: float = 1.0

    @property
    def name(self) -> str:
        return (f"{self.source}-{self.start}+{self.count}" + (f"-shift{self.shift[0]},{self.shift[1]}"
                if self.shift != (0, 0) else "") + (f"-grey{self.grey:g}" if self.grey != 1.0 else ""))

    def apply(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The batch cut from a source's training ``images`` and ``labels``."""
        window = slice(self.start, self.start + self.count)
        return scaled_grey(shifted(images[window], *self.shift), self.grey), labels[window]


def clean_battery(history_images: int, available: int, weekly: int) -> list[CleanBatch]:
    """At least 50 clean batches against a base history of the first ``history_images`` training images
    (``available`` in all): MNIST slices of 2,000 to 45,000 images after the history, a 50,000-image batch
    (shifted by one pixel, since MNIST has no 50,000 images outside the history), shifted copies, grey levels
    scaled by 0.9-1.1, and the weekly batches of ``weekly`` images of the transposed-MNIST dataset."""
    free = available - history_images
    sizes = (2_000, 3_000, 5_000, 8_000, 10_000, 15_000, 20_000, 30_000, 45_000)
    slices = [CleanBatch("mnist", history_images + (index * 7_919) % (free - size + 1), size)
              for index, size in enumerate(sizes + sizes[:5])]
    shifts = [(dx, dy) for dx in (-2, -1, 0, 1, 2) for dy in (-2, -1, 0, 1, 2) if max(abs(dx), abs(dy)) > 0]
    moved = [CleanBatch("mnist", history_images + 5_000 * (index % 8), 5_000, shift)
             for index, shift in enumerate(shifts[::3] + shifts[1::3][:8])]
    grey = [CleanBatch("mnist", history_images + 10_000 * index, 5_000, grey=factor)
            for index, factor in enumerate((0.9, 0.95, 1.05, 1.1))] + \
        [CleanBatch("mnist", history_images + 2_000 + 10_000 * index, 5_000, (1, 0), factor)
         for index, factor in enumerate((0.92, 1.08))]
    largest = [CleanBatch("mnist", available - 50_000, 50_000, (1, 0))]
    other = [CleanBatch("mnist-transposed", history_images + weekly * week, weekly) for week in range(free // weekly)]
    return slices + moved + grey + largest + other
