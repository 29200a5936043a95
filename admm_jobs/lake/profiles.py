"""Profiles: what validation needs to know about a batch (or a test set) without reading its pixels again.

Ingest writes one profile per directory of part files (``D/batches/<id>/validation-<f>/``,
``D/test-sets/<sha>/``), committed by its record, written last::

    <directory>/profile/ids-<split>.parquet    the split's image keys with their labels, sorted by key
    <directory>/profile/ids-<split>.filter     a Bloom filter of those keys (:class:`KeyFilter`)
    <directory>/profile/profile.json           idx-profile/2, below

``profile.json``: ``{"format", "sha256"`` (the content the directory was written from), ``"files"``
(each part file's signature, :func:`storage.file_signatures`, when the profile was written),
``"splits": {split: {"rows", "ids", "filter": {"file", "bits", "hashes"}, "id_groups"`` (the first key
of each row group of the id file), ``"groups": [group, ...], "ink": [ink, ...]}}}``, one group per label
value of the split::

    label                      the label (None for rows without one)
    rows, images               rows; rows holding a whole image (PIXELS_PER_IMAGE grey levels)
    pixel_count_min/_max       fewest / most grey levels in a row
    pixel_min, pixel_max       smallest / largest grey level
    null_image_ids             rows without an image id
    repeated_image_ids         rows whose image id occurs in another row of this directory's split
    blank, saturated           images with nothing drawn / more than half their pixels saturated
    intensity_sum, intensity_square_sum   sums of each image's mean grey level / 255 and of its square

and one ``ink`` record per label value, ``{"label", "images"}``: ``images[p]`` is how many of the label's whole
images have ink (a grey level above :data:`INK_GREY`) at pixel ``p`` (row-major), the statistic of the pixel
drift check (:mod:`admm_jobs.scoring.pixel_checks`). Format /2 added ``ink``: a /1 profile counts as none,
so :func:`ensure_profile` writes it again from the part files once (the back-fill of older lakes).

Counts and sums add up and extrema combine, so the statistics of several batches are those of
their profiles merged (:func:`merge_groups`); ``repeated_image_ids`` counts repeats inside the
directory only, repeats across directories are found by testing one's keys against the other's key
filter and confirming the candidates in the row groups of its id file that may hold them. Profiles
written before key filters existed get theirs from their id files, once (:func:`add_filters`).
An image key is the image id (16 hex digits of sha256 of its bytes) read as an unsigned integer.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from admm_jobs.lake import storage
from admm_jobs.lake.dataset import PIXELS_PER_IMAGE, SPLITS, DatasetError, load_manifest, read_chunks, split_directory

PROFILE_FORMAT = "idx-profile/2"  # /2 added the per-label ink counts; /1 is profiled again
PROFILE_DIR = "profile"
PROFILE_RECORD = "profile.json"
CHUNK_ROWS = 10_000  # rows read at once: memory holds one chunk of pixels (7.8 MB), whatever the batch size
ID_ROWS_PER_GROUP = 65_536  # keys per row group of an id file (0.5 MB read at once)
# The key filter of a split: a Bloom filter of 28 bits per key with 19 hash functions, false positive rate
# 1.5e-6, so a new batch of 50,000 images meets one false candidate in about 13 old batches, whose id file
# row group is then read to confirm it. 3.5 bytes per key, against the id file's 10.
FILTER_BITS_PER_KEY = 28
FILTER_HASHES = 19
FILTER_KEYS_AT_ONCE = 65_536  # keys hashed at once (memory: 8 bytes per hash per key)
NULL_LABEL = -1  # the label of rows without one, in key arrays
BLANK_MAX_GREY = 10  # an image with no grey level above this has nothing drawn
SATURATED_GREY = 250  # an image with more than half its pixels at this level or above is saturated
INK_GREY = 128  # a pixel above this grey level has ink: half-way, so rescaling grey levels by 10 % moves few pixels
SUMMED = ("rows", "images", "null_image_ids", "repeated_image_ids", "blank", "saturated", "intensity_sum",
          "intensity_square_sum")
SMALLEST = ("pixel_count_min", "pixel_min")
LARGEST = ("pixel_count_max", "pixel_max")
ID_SCHEMA = pa.schema([pa.field("image_key", pa.uint64(), nullable=False),
                       pa.field("label", pa.int16(), nullable=False)])


def image_keys(image_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The uint64 key of each (non-null) image id: its 16 hex digits as an integer; an id of another
    form (a damaged file) gets the first 8 bytes of sha256 of its text."""
    ids = image_ids.drop_null().to_pylist()
    try:
        if all(len(image_id) == 16 for image_id in ids):
            return np.frombuffer(bytes.fromhex("".join(ids)), dtype=">u8").astype(np.uint64)
    except ValueError:
        pass
    return np.array([int(image_id, 16) if len(image_id) == 16 and _is_hex(image_id)
                     else int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big")
                     for image_id in ids], dtype=np.uint64)


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


def pixel_statistics(pixels: pa.ChunkedArray | pa.ListArray) -> pd.DataFrame:
    """Per row of a list column: ``pixel_count`` (non-null values), ``pixel_min``, ``pixel_max``.

    A row without values (null or empty list) has count 0 and null min/max.
    """
    pixels = pixels.combine_chunks() if isinstance(pixels, pa.ChunkedArray) else pixels
    values = pc.list_flatten(pixels)
    lengths = pc.list_value_length(pixels)
    if not pixels.null_count and not values.null_count and len(pixels) and pc.min_max(lengths).as_py() == {
            "min": PIXELS_PER_IMAGE, "max": PIXELS_PER_IMAGE}:  # whole images only: one numpy pass
        grey = values.to_numpy().reshape(len(pixels), PIXELS_PER_IMAGE)
        return pd.DataFrame({"pixel_count": np.full(len(pixels), PIXELS_PER_IMAGE, dtype=np.int64),
                             "pixel_min": grey.min(axis=1).astype(float), "pixel_max": grey.max(axis=1).astype(float)})
    values = pa.table({"row": pc.list_parent_indices(pixels), "value": values})
    per_row = values.group_by("row").aggregate([("value", "count"), ("value", "min"), ("value", "max")])
    rows = per_row.column("row").to_numpy()
    count = np.zeros(len(pixels), dtype=np.int64)
    low = np.full(len(pixels), np.nan)
    high = np.full(len(pixels), np.nan)
    count[rows] = per_row.column("value_count").to_numpy()
    # min/max are null for rows whose values are all null; to_numpy turns those into NaN.
    low[rows] = per_row.column("value_min").to_numpy(zero_copy_only=False)
    high[rows] = per_row.column("value_max").to_numpy(zero_copy_only=False)
    return pd.DataFrame({"pixel_count": count, "pixel_min": low, "pixel_max": high})


def whole_images(pixels: pa.ChunkedArray | pa.ListArray, pixel_count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a pixels column holding a whole image (PIXELS_PER_IMAGE grey levels, none null; ``pixel_count``
    from :func:`pixel_statistics`): their indices and grey levels, uint8 (n, PIXELS_PER_IMAGE)."""
    pixels = pixels.combine_chunks() if isinstance(pixels, pa.ChunkedArray) else pixels
    lengths = pc.fill_null(pc.list_value_length(pixels), 0).to_numpy()
    rows = np.flatnonzero((lengths == PIXELS_PER_IMAGE) & (pixel_count == PIXELS_PER_IMAGE))
    whole = pixels if len(rows) == len(pixels) else pixels.take(pa.array(rows))
    values = pc.list_flatten(whole).to_numpy(zero_copy_only=False)
    return rows, values.astype(np.uint8, copy=False).reshape(-1, PIXELS_PER_IMAGE)


def image_statistics(pixels: np.ndarray) -> pd.DataFrame:
    """Per image (rows of uint8 grey levels): ``intensity`` (mean grey level in [0, 1]), ``blank``, ``saturated``."""
    return pd.DataFrame({
        "intensity": pixels.mean(axis=1) / 255.0,
        "blank": pixels.max(axis=1, initial=0) <= BLANK_MAX_GREY,
        "saturated": (pixels >= SATURATED_GREY).mean(axis=1) > 0.5,
    })


def labels_of(table: pa.Table) -> np.ndarray:
    """The label column as int16, :data:`NULL_LABEL` for rows without one."""
    return pc.fill_null(table.column("label").cast(pa.int16()), NULL_LABEL).to_numpy()


def chunk_groups(table: pa.Table) -> tuple[pd.DataFrame, tuple[np.ndarray, np.ndarray]]:
    """The group statistics (see the module docstring, but ``repeated_image_ids``) of one chunk of rows
    with columns image_id, label, pixels, indexed by label; and its whole images (:func:`whole_images`)."""
    rows = pixel_statistics(table.column("pixels"))
    rows["label"] = labels_of(table)
    rows["null_image_ids"] = table.column("image_id").is_null().to_numpy(zero_copy_only=False)
    indices, pixels = whole_images(table.column("pixels"), rows["pixel_count"].to_numpy())
    images = image_statistics(pixels).set_index(indices).reindex(range(len(rows)))
    rows["images"] = images["intensity"].notna()
    rows["blank"] = images["blank"].fillna(False).astype(bool)
    rows["saturated"] = images["saturated"].fillna(False).astype(bool)
    rows["intensity_sum"] = images["intensity"].fillna(0.0)
    rows["intensity_square_sum"] = rows["intensity_sum"] ** 2
    grouped = rows.groupby("label")
    return pd.DataFrame({
        "rows": grouped.size(), "images": grouped["images"].sum(),
        "pixel_count_min": grouped["pixel_count"].min(), "pixel_count_max": grouped["pixel_count"].max(),
        "pixel_min": grouped["pixel_min"].min(), "pixel_max": grouped["pixel_max"].max(),
        "null_image_ids": grouped["null_image_ids"].sum(), "repeated_image_ids": 0,
        "blank": grouped["blank"].sum(), "saturated": grouped["saturated"].sum(),
        "intensity_sum": grouped["intensity_sum"].sum(), "intensity_square_sum": grouped["intensity_square_sum"].sum(),
    }), (indices, pixels)


def ink_by_label(pixels: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """Per label (index) and pixel (columns 0..P-1): how many of the whole images (rows of uint8 grey levels)
    with that label have ink at the pixel (grey level above :data:`INK_GREY`)."""
    present, row_label = np.unique(labels, return_inverse=True)
    one_hot = np.zeros((len(present), len(labels)), dtype=np.int32)
    one_hot[row_label, np.arange(len(labels))] = 1
    counts = one_hot @ (pixels > INK_GREY).astype(np.int32)  # a product of small ints: exact, and one pass
    return pd.DataFrame(counts.astype(np.int64), index=pd.Index(present.astype(np.int16), name="label"))


def merge_ink(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Ink counts (:func:`ink_by_label`) of several chunks or profiles, added per label."""
    frames = [frame for frame in frames if len(frame)]
    if not frames:
        return pd.DataFrame(columns=range(PIXELS_PER_IMAGE), index=pd.Index([], name="label"), dtype=np.int64)
    return pd.concat(frames).groupby(level=0).sum().rename_axis("label").sort_index()


@dataclasses.dataclass(frozen=True)
class ClassInk:
    """The pixel drift check's statistic of some images, per class 0..K-1: ``images`` (K,) whole images,
    ``ink`` (K, P) of them with ink at each pixel."""

    images: np.ndarray
    ink: np.ndarray


def class_ink(groups: pd.DataFrame, ink: pd.DataFrame, classes: int) -> ClassInk:
    """The :class:`ClassInk` of label-indexed group statistics and ink counts (other labels left out)."""
    return ClassInk(groups["images"].reindex(range(classes), fill_value=0).to_numpy(dtype=np.int64),
                    ink.reindex(range(classes), fill_value=0).to_numpy(dtype=np.int64))


def merge_groups(groups: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Group statistics of several chunks or profiles, per label: sums added, extrema combined."""
    frames = [frame for frame in groups if len(frame)]
    if not frames:
        return pd.DataFrame(columns=[*SUMMED, *SMALLEST, *LARGEST], index=pd.Index([], name="label"))
    grouped = pd.concat(frames).groupby(level=0)
    merged = pd.concat([grouped[list(SUMMED)].sum(), grouped[list(SMALLEST)].min(), grouped[list(LARGEST)].max()],
                       axis=1)
    return merged.rename_axis("label").sort_index()


def repeated_rows(sorted_keys: np.ndarray) -> np.ndarray:
    """Which entries of a sorted key array equal a neighbour (every row of a repeated key)."""
    same_as_next = sorted_keys[1:] == sorted_keys[:-1]
    repeated = np.zeros(len(sorted_keys), dtype=bool)
    repeated[1:] |= same_as_next
    repeated[:-1] |= same_as_next
    return repeated


def counts_by_label(labels: np.ndarray, flagged: np.ndarray) -> pd.Series:
    """How many flagged rows carry each label."""
    return pd.Series(labels[flagged]).value_counts()


@dataclasses.dataclass
class SplitProfile:
    """The profile of one split of a directory: group statistics by label, and its keys sorted with their labels."""

    groups: pd.DataFrame
    keys: np.ndarray
    labels: np.ndarray
    ink: pd.DataFrame  # :func:`ink_by_label`


class SplitProfiler:
    """Accumulates a :class:`SplitProfile` chunk by chunk (memory: the groups, and 10 bytes per image for keys)."""

    def __init__(self) -> None:
        self.groups: list[pd.DataFrame] = []
        self.keys: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.ink: list[pd.DataFrame] = []

    def add(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Take in one chunk of rows (columns image_id, label, pixels); return its whole images, as
        :func:`whole_images` (for callers that score them)."""
        groups, images = chunk_groups(table)
        self.groups.append(groups)
        self.ink.append(ink_by_label(images[1], labels_of(table)[images[0]]))
        self.keys.append(image_keys(table.column("image_id")))
        self.labels.append(labels_of(table)[table.column("image_id").is_valid().to_numpy(zero_copy_only=False)])
        return images

    def finish(self) -> SplitProfile:
        keys = np.concatenate(self.keys) if self.keys else np.zeros(0, np.uint64)
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0, np.int16)
        order = np.argsort(keys, kind="stable")
        keys, labels = keys[order], labels[order]
        groups = merge_groups(self.groups)
        repeats = counts_by_label(labels, repeated_rows(keys))
        groups["repeated_image_ids"] = repeats.reindex(groups.index, fill_value=0).astype(int)
        return SplitProfile(groups, keys, labels, merge_ink(self.ink))


def profile_files(uris: list[str], chunk_rows: int = CHUNK_ROWS) -> SplitProfile:
    """The profile of a split's part files, read one chunk at a time."""
    profiler = SplitProfiler()
    for table in read_chunks(uris, chunk_rows):
        profiler.add(table)
    return profiler.finish()


# ---------------------------------------------------------------- key filters


def filter_positions(keys: np.ndarray, size: int, hashes: int) -> np.ndarray:
    """The ``hashes`` bit positions of each key in a filter of ``size`` bits, (len(keys), hashes): double hashing
    (Kirsch and Mitzenmacher) on the key's two 32-bit halves, which are uniform (a key is a sha256 prefix)."""
    low, high = keys & np.uint64(0xFFFF_FFFF), (keys >> np.uint64(32)) | np.uint64(1)
    return (low[:, None] + np.arange(hashes, dtype=np.uint64) * high[:, None]) % np.uint64(size)


@dataclasses.dataclass(frozen=True)
class KeyFilter:
    """A Bloom filter of image keys: :meth:`may_contain` never misses a key it was built from, and says yes
    to another key with probability about (1 - e^(-hashes * keys / size))^hashes."""

    bits: np.ndarray  # ``size`` bits, packed little-endian into uint8
    size: int
    hashes: int

    @classmethod
    def of(cls, keys: np.ndarray, bits_per_key: int = FILTER_BITS_PER_KEY, hashes: int = FILTER_HASHES
           ) -> KeyFilter:
        size = max(64, -(-len(keys) * bits_per_key // 64) * 64)
        bits = np.zeros(size // 8, dtype=np.uint8)
        for first in range(0, len(keys), FILTER_KEYS_AT_ONCE):
            positions = filter_positions(keys[first:first + FILTER_KEYS_AT_ONCE], size, hashes).ravel()
            np.bitwise_or.at(bits, positions >> np.uint64(3), np.left_shift(1, positions & np.uint64(7)).astype(np.uint8))
        return cls(bits, size, hashes)

    def may_contain(self, keys: np.ndarray) -> np.ndarray:
        """For each key, whether it may be one the filter was built from (never False for one)."""
        found = np.zeros(len(keys), dtype=bool)
        for first in range(0, len(keys), FILTER_KEYS_AT_ONCE):
            positions = filter_positions(keys[first:first + FILTER_KEYS_AT_ONCE], self.size, self.hashes)
            set_bits = (self.bits[positions >> np.uint64(3)] >> (positions & np.uint64(7)).astype(np.uint8)) & 1
            found[first:first + FILTER_KEYS_AT_ONCE] = set_bits.all(axis=1)
        return found


def groups_holding(group_first_keys: list[int], keys: np.ndarray) -> list[int]:
    """The row groups of a sorted id file (``group_first_keys``: the first key of each) that may hold ``keys``."""
    if not group_first_keys or not len(keys):
        return []
    groups = np.searchsorted(np.array(group_first_keys, dtype=np.uint64), keys, "right") - 1
    return sorted({int(group) for group in groups if group >= 0})


# ---------------------------------------------------------------- stored profiles


def ids_file(split: str) -> str:
    return f"ids-{split}.parquet"


def filter_file(split: str) -> str:
    return f"ids-{split}.filter"


def write_filter(profile_dir: str, split: str, sorted_keys: np.ndarray) -> dict[str, Any]:
    """Write the key filter of a split's sorted keys into ``profile_dir``; return the profile's entries for it:
    ``filter`` (its file, size in bits and hash count) and ``id_groups`` (the first key of each row group of
    the id file, so a confirmation reads only the groups it needs)."""
    key_filter = KeyFilter.of(sorted_keys)
    storage.write_bytes(storage.join(profile_dir, filter_file(split)), key_filter.bits.tobytes())
    return {"filter": {"file": filter_file(split), "bits": key_filter.size, "hashes": key_filter.hashes},
            "id_groups": [int(key) for key in sorted_keys[::ID_ROWS_PER_GROUP]]}


def load_filter(directory_uri: str, entry: Mapping[str, Any]) -> KeyFilter:
    """The key filter of a split of a directory's profile (``entry``: the split's entry)."""
    spec = entry["filter"]
    bits = np.frombuffer(storage.read_bytes(storage.join(directory_uri, PROFILE_DIR, spec["file"])), dtype=np.uint8)
    if bits.size * 8 != spec["bits"]:
        raise DatasetError(f"{storage.join(directory_uri, PROFILE_DIR, spec['file'])}: {bits.size * 8} bits, "
                           f"its profile says {spec['bits']}")
    return KeyFilter(bits, spec["bits"], spec["hashes"])


def id_file_bytes(profile: SplitProfile) -> bytes:
    table = pa.Table.from_arrays([pa.array(profile.keys, pa.uint64()), pa.array(profile.labels, pa.int16())],
                                 schema=ID_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy", row_group_size=ID_ROWS_PER_GROUP)
    return sink.getvalue().to_pybytes()


def groups_json(groups: pd.DataFrame) -> list[dict[str, Any]]:
    """Group statistics as JSON records (plain ints and floats; None for a missing label or extremum)."""
    records = []
    for label, row in groups.iterrows():
        record = {"label": None if label == NULL_LABEL else int(label)}
        for column in (*SUMMED, *SMALLEST, *LARGEST):
            value = row[column]
            record[column] = None if pd.isna(value) else (float(value) if "intensity" in column else int(value))
        records.append(record)
    return records


def groups_frame(records: list[Mapping[str, Any]]) -> pd.DataFrame:
    """The inverse of :func:`groups_json`."""
    frame = pd.DataFrame.from_records(records, columns=["label", *SUMMED, *SMALLEST, *LARGEST])
    frame["label"] = frame["label"].fillna(NULL_LABEL).astype(np.int16)
    return frame.set_index("label").astype({column: float for column in (*SMALLEST, *LARGEST)})


def ink_json(ink: pd.DataFrame) -> list[dict[str, Any]]:
    """Ink counts as JSON records, one per label (None for rows without one)."""
    return [{"label": None if label == NULL_LABEL else int(label), "images": [int(count) for count in row]}
            for label, row in zip(ink.index, ink.to_numpy())]


def ink_frame(records: list[Mapping[str, Any]]) -> pd.DataFrame:
    """The inverse of :func:`ink_json`."""
    labels = [NULL_LABEL if record["label"] is None else record["label"] for record in records]
    return merge_ink([pd.DataFrame([record["images"] for record in records],
                                   index=pd.Index(np.array(labels, dtype=np.int16), name="label"), dtype=np.int64)])


def write_profile(directory_uri: str, sha256: str, part_paths: list[str], splits: Mapping[str, SplitProfile]
                  ) -> dict[str, Any]:
    """Write the profile of a directory whose part files (paths relative to it) hold ``splits``; return it."""
    signatures = storage.file_signatures(directory_uri)
    record = {
        "format": PROFILE_FORMAT, "sha256": sha256,
        "files": {path: signatures.get(storage.join(directory_uri, path)) for path in part_paths},
        "splits": {split: {"rows": int(profile.groups["rows"].sum()), "ids": ids_file(split),
                           "groups": groups_json(profile.groups), "ink": ink_json(profile.ink)}
                   for split, profile in splits.items()},
    }
    with storage.staged_directory(storage.join(directory_uri, PROFILE_DIR)) as staging:
        for split, profile in splits.items():
            storage.write_bytes(storage.join(staging, ids_file(split)), id_file_bytes(profile))
            record["splits"][split].update(write_filter(staging, split, profile.keys))
        storage.write_json(storage.join(staging, PROFILE_RECORD), record)
    return record


def has_filters(profile: Mapping[str, Any]) -> bool:
    return all("filter" in entry for entry in profile["splits"].values())


def add_filters(directory_uri: str, profile: dict[str, Any]) -> dict[str, Any]:
    """Write the key filters a profile lacks (profiles written before filters existed get theirs once, from
    their id files), then the profile naming them; return it."""
    profile_dir = storage.join(directory_uri, PROFILE_DIR)
    splits = dict(profile["splits"])
    for split, entry in splits.items():
        if "filter" not in entry:
            keys = [keys for keys, _ in id_chunks(storage.join(profile_dir, entry["ids"]))]
            sorted_keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
            splits[split] = {**entry, **write_filter(profile_dir, split, sorted_keys)}
    profile = {**profile, "splits": splits}
    storage.write_json(storage.join(profile_dir, PROFILE_RECORD), profile)
    return profile


def load_profile(directory_uri: str, sha256: str) -> dict[str, Any] | None:
    """The committed profile of a directory written from content ``sha256``; None if there is none (or it
    describes other content)."""
    uri = storage.join(directory_uri, PROFILE_DIR, PROFILE_RECORD)
    try:
        profile = storage.read_json(uri) if storage.exists(uri) else None
    except storage.StorageError:
        return None
    if not isinstance(profile, dict) or profile.get("format") != PROFILE_FORMAT or profile.get("sha256") != sha256:
        return None
    return profile


def ensure_profile(directory_uri: str, sha256: str, files_by_split: Mapping[str, list[str]]) -> dict[str, Any]:
    """The profile of a directory, written from its part files (paths relative to it) if it has none yet:
    lakes written before profiles (or their key filters) existed get theirs once, on first need."""
    profile = load_profile(directory_uri, sha256)
    if profile is not None:
        return profile if has_filters(profile) else add_filters(directory_uri, profile)
    splits = {split: profile_files([storage.join(directory_uri, path) for path in paths])
              for split, paths in files_by_split.items()}
    return write_profile(directory_uri, sha256, [path for paths in files_by_split.values() for path in paths],
                         splits)


@dataclasses.dataclass
class PartDirectory:
    """One directory of part files a dataset is made of: a batch's splits, or the test set."""

    batch: str | None  # the batch id; None for the test set
    directory: str
    sha256: str  # the content it was written from, as its profile records
    files: dict[str, list[str]]  # split -> part files, relative to ``directory``


def part_directories(dataset_uri: str, manifest: Mapping[str, Any]) -> list[PartDirectory]:
    """The directories of part files of a dataset, in manifest order."""
    shas = {batch["id"]: batch["sha256"] for batch in manifest.get("batches", [])}
    shas[None] = manifest.get("test_set", {}).get("sha256", manifest["version"])
    parts: dict[str, PartDirectory] = {}
    for split in SPLITS:
        for entry in manifest["splits"][split]["files"]:
            uri = storage.join(dataset_uri, entry["path"])
            directory, relative = uri.rsplit(f"/{split_directory(split)}/", 1)
            part = parts.setdefault(directory, PartDirectory(
                entry.get("batch"), directory, shas.get(entry.get("batch"), manifest["version"]), {}))
            part.files.setdefault(split, []).append(f"{split_directory(split)}/{relative}")
    return list(parts.values())


def dataset_class_ink(dataset_uri: str, classes: int) -> ClassInk:
    """The ink counts of a dataset's training and validation images (not the test set's), summed from the
    profiles of its parts (written first where missing or older than ink counts)."""
    groups, ink = [], []
    for part in part_directories(dataset_uri, load_manifest(dataset_uri)):
        for split, entry in ensure_profile(part.directory, part.sha256, part.files)["splits"].items():
            if split != "test":
                groups.append(groups_frame(entry["groups"]))
                ink.append(ink_frame(entry["ink"]))
    return class_ink(merge_groups(groups), merge_ink(ink), classes)


def unchanged_files(directory_uri: str, profile: Mapping[str, Any], paths: list[str]) -> bool:
    """Whether the part files ``paths`` still have the signatures recorded in the profile (nothing is read)."""
    signatures = storage.file_signatures(directory_uri)
    recorded = profile.get("files") or {}
    return all(recorded.get(path) is not None and signatures.get(storage.join(directory_uri, path)) == recorded[path]
               for path in paths)


def record_signatures(directory_uri: str, profile: dict[str, Any], paths: list[str]) -> None:
    """Record the current signatures of part files found intact by their hash (a copied lake, a touched file)."""
    signatures = storage.file_signatures(directory_uri)
    profile = {**profile, "files": {path: signatures.get(storage.join(directory_uri, path)) for path in paths}}
    storage.write_json(storage.join(directory_uri, PROFILE_DIR, PROFILE_RECORD), profile)


def id_chunks(uri: str, groups: Iterable[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The (sorted keys, labels) of an id file, one row group at a time: the row groups ``groups`` (all if None)."""
    try:
        with storage.open_binary(uri) as handle:
            parquet_file = pq.ParquetFile(handle)
            for index in range(parquet_file.num_row_groups) if groups is None else groups:
                table = parquet_file.read_row_group(index)
                yield (table.column("image_key").to_numpy().astype(np.uint64, copy=False),
                       table.column("label").to_numpy().astype(np.int16, copy=False))
    except storage.StorageError as exc:
        raise DatasetError(str(exc)) from exc
    except pa.ArrowException as exc:
        raise DatasetError(f"{uri}: unreadable id file: {exc}") from exc


def members(query: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """For each query key, whether it occurs in ``sorted_keys`` (ascending)."""
    if not len(sorted_keys) or not len(query):
        return np.zeros(len(query), dtype=bool)
    positions = np.searchsorted(sorted_keys, query).clip(max=len(sorted_keys) - 1)
    return sorted_keys[positions] == query
