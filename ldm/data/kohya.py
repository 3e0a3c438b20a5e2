"""kohya sd-scripts' dataset layout: folders of images with caption sidecars, ``N_name`` repeats, dataset configs.

A folder of images (``.png .jpg .jpeg .webp .bmp``) whose captions are sidecar files with the same stem
(``cat.png`` + ``cat.txt``, or another ``caption_extension``). A data folder either holds images itself (repeated
once per epoch) or subfolders named ``N_name`` (kohya's DreamBooth layout): each image of ``10_sks dog`` is seen 10
times per epoch, and ``sks dog`` (the class tokens) is the caption of its images that have no sidecar. A subfolder
with any other name is an error, as are images beside ``N_name`` subfolders; hidden entries are ignored.

A dataset config (kohya's ``dataset_config``, TOML, or the same structure in YAML) lists subsets, each with its own
folder and options::

    [general]                     # defaults for every dataset and subset
    shuffle_caption = true
    [[datasets]]                  # one dataset: the bucket options train one model shape set
    resolution = 512              # or [768, 512] (width, height)
    enable_bucket = true
    [[datasets.subsets]]
    image_dir = "data/sks"        # relative paths are taken from the working directory, as kohya does
    num_repeats = 10
    keep_tokens = 1

A subset with ``is_reg = true`` holds regularization (class) images: they are DreamBooth's class half and train
only with ``with_prior_preservation`` (:mod:`ldm.data.dreambooth`); ``is_reg`` is a subset key only, as in kohya.

Keys that kohya has and this trainer does not implement, and keys nobody has, are refused by name. A subset option
not set falls back to ``[[datasets]]``, then ``[general]``, then the training option of the same name.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ldm.data.captions import CaptionRules
from ldm.data.records import CSV_INDEX, JSONL_INDEX, Record, read_index
from ldm.util import read_text_utf8

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REPEATS_FOLDER = re.compile(r"^(\d+)_(.*)$")
_SHOWN = 10

# option -> accepted type(s) of its value in a dataset config
CAPTION_KEYS = {
    "shuffle_caption": bool,
    "keep_tokens": int,
    "caption_tag_dropout_rate": (int, float),
    "caption_dropout_rate": (int, float),
    "caption_prefix": str,
    "caption_suffix": str,
}
SUBSET_KEYS = {
    "image_dir": str,
    "is_reg": bool,
    "num_repeats": int,
    "caption_extension": str,
    "class_tokens": str,
    **CAPTION_KEYS,
}
SUBSET_ONLY = ("image_dir", "is_reg")  # kohya's distinct subset keys: not in [general] or [[datasets]]
DATASET_KEYS = {
    "resolution": (int, list),
    "enable_bucket": bool,
    "min_bucket_reso": int,
    "max_bucket_reso": int,
    "bucket_reso_steps": int,
    "bucket_no_upscale": bool,
}
# kohya's keys that a config may hold but this trainer does not implement (refused with that reason)
NOT_IMPLEMENTED = (
    "alpha_mask batch_size cache_info caption_dropout_every_n_epochs caption_separator color_aug conditioning_data_dir "
    "debug_dataset enable_wildcard face_crop_aug_range flip_aug keep_tokens_separator metadata_file "
    "network_multiplier random_crop resize_interpolation secondary_separator token_warmup_min token_warmup_step "
    "validation_seed validation_split"
).split()


@dataclass(frozen=True)
class Subset:
    """One folder of images: how often it repeats per epoch, where its captions are, how they are processed."""

    image_dir: str
    num_repeats: int = 1
    caption_extension: str = ".txt"
    class_tokens: str = ""  # the caption of an image without a sidecar file
    rules: CaptionRules = field(default_factory=CaptionRules)
    is_reg: bool = False  # regularization (class) images: DreamBooth's prior-preservation half


@dataclass(frozen=True)
class DatasetConfig:
    """A parsed dataset config: its subsets and the dataset-level options it sets (bucket options, resolution)."""

    path: str
    subsets: tuple[Subset, ...]
    options: dict


def _load(path: str) -> dict:
    import tomllib
    import yaml

    if not path.endswith((".toml", ".yaml", ".yml")):
        raise ValueError(f"{path}: a dataset config is a .toml, .yaml or .yml file")
    text = read_text_utf8(path)
    try:
        data = tomllib.loads(text) if path.endswith(".toml") else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:  # both name the line
        raise ValueError(f"{path}: cannot parse: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table/mapping at the top level")
    return data


def _checked(table, allowed: dict, where: str) -> dict:
    """``table``'s keys checked against ``allowed`` (name -> type) and its values against their types."""
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a table/mapping, got {type(table).__name__}")
    for key, value in table.items():
        if key not in allowed:
            if key in NOT_IMPLEMENTED:
                raise ValueError(f"{where}: key {key!r} is not supported (kohya has it; this trainer does not)")
            if key in SUBSET_KEYS or key in DATASET_KEYS:
                raise ValueError(f"{where}: key {key!r} is not supported in this table")
            raise ValueError(f"{where}: unknown key {key!r} (valid: {', '.join(sorted(allowed))})")
        types = allowed[key] if isinstance(allowed[key], tuple) else (allowed[key],)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"{where}: key {key!r} has a wrong value {value!r}")
    return dict(table)


def _resolution(value, where: str) -> str:
    """A config's ``resolution`` (an int, or ``[width, height]``) as the training option's string."""
    if isinstance(value, int):
        return str(value)
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{where}: 'resolution' must be an integer or [width, height], got {value!r}")
    return f"{value[0]},{value[1]}"


def _subset(values: dict, defaults: Subset, where: str) -> Subset:
    if "image_dir" not in values:
        raise ValueError(f"{where}: a subset needs 'image_dir'")
    if values.get("num_repeats", 1) < 1:
        raise ValueError(f"{where}: 'num_repeats' must be >= 1, got {values['num_repeats']}")
    caption = {k: v for k, v in values.items() if k in CAPTION_KEYS}
    try:
        rules = replace(defaults.rules, **caption)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    plain = {k: v for k, v in values.items() if k not in CAPTION_KEYS}
    return replace(defaults, **plain, rules=rules)


def read_dataset_config(path, caption_extension: str = ".txt", rules: CaptionRules | None = None) -> DatasetConfig:
    """Parse a dataset config; ``caption_extension`` and ``rules`` are the training options' values, the fallback of
    every subset. Errors name the file and the table (``datasets[0].subsets[1]``) and key."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"dataset_config {path}: no such file")
    data = _checked(_load(path), {"general": dict, "datasets": list}, path)
    every = {k: v for k, v in {**SUBSET_KEYS, **DATASET_KEYS}.items() if k not in SUBSET_ONLY}
    general = _checked(data.get("general", {}), every, f"{path}: [general]")
    datasets = data.get("datasets", [])
    if len(datasets) != 1:
        raise ValueError(
            f"{path}: needs exactly one [[datasets]] table, found {len(datasets)} (put all subsets in one dataset)"
        )
    dataset = _checked(datasets[0], {**every, "subsets": list}, f"{path}: datasets[0]")
    subsets = dataset.pop("subsets", [])
    if not subsets:
        raise ValueError(f"{path}: datasets[0] has no [[datasets.subsets]]")
    merged = {**general, **dataset}
    fallback = {k: v for k, v in merged.items() if k in SUBSET_KEYS}
    defaults = Subset("", caption_extension=caption_extension, rules=rules or CaptionRules())
    parsed = []
    for i, table in enumerate(subsets):
        where = f"{path}: datasets[0].subsets[{i}]"
        values = _checked(table, SUBSET_KEYS, where)
        parsed.append(_subset({**fallback, **values}, defaults, where))
    options = {k: v for k, v in merged.items() if k in DATASET_KEYS}
    if "resolution" in options:
        options["resolution"] = _resolution(options["resolution"], f"{path}: resolution")
    return DatasetConfig(path, tuple(parsed), options)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def folder_subsets(data_path, caption_extension: str = ".txt", rules: CaptionRules | None = None) -> list[Subset]:
    """The subsets of a kohya data folder: its ``N_name`` subfolders, or the folder itself (1 repeat)."""
    root = Path(data_path)
    rules = rules or CaptionRules()
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        if not _images_in(root):
            raise ValueError(
                f"{root}: no {CSV_INDEX}, {JSONL_INDEX}, images ({' '.join(IMAGE_EXTENSIONS)}) or N_name "
                "subfolders found"
            )
        return [Subset(str(root), 1, caption_extension, "", rules)]
    subsets = []
    for folder in folders:
        match = REPEATS_FOLDER.match(folder.name)
        if match is None:
            raise ValueError(
                f"{folder}: subfolder name is not N_name (N repeats per epoch, then the class tokens, e.g. "
                "'10_sks dog')"
            )
        if int(match.group(1)) < 1:
            raise ValueError(f"{folder}: the repeat count must be >= 1")
        subsets.append(Subset(str(folder), int(match.group(1)), caption_extension, match.group(2), rules))
    loose = _images_in(root)
    if loose:
        raise ValueError(f"{root}: has images ({loose[0].name}, ...) beside N_name subfolders; move them into one")
    return subsets


def _caption(image: Path, subset: Subset) -> str | None:
    """The first line of the image's sidecar, or ``None`` when there is no sidecar."""
    sidecar = image.with_suffix(subset.caption_extension)
    if not sidecar.is_file():
        return None
    lines = read_text_utf8(sidecar).splitlines()
    if not lines or not lines[0].strip():
        raise ValueError(f"{sidecar}: empty caption file (its first line is the caption)")
    return lines[0].strip()


def subset_records(subsets, strict_captions: bool = False, keep=None) -> list[Record]:
    """Every subset's images (or those of the subset indices in ``keep``) as records (``num_repeats`` copies each,
    its index as ``Record.subset``).

    An image without a sidecar takes the subset's class tokens as caption, with one warning naming the images (an
    error naming the first one with ``strict_captions``)."""
    records, missing = [], []
    for i, subset in enumerate(subsets):
        if keep is not None and i not in keep:
            continue
        folder = Path(subset.image_dir)
        if not folder.is_dir():
            raise ValueError(f"image_dir {folder}: no such folder")
        images = _images_in(folder)
        if not images:
            raise ValueError(f"{folder}: no images ({' '.join(IMAGE_EXTENSIONS)})")
        for image in images:
            caption = _caption(image, subset)
            if caption is None:
                if strict_captions:
                    raise ValueError(
                        f"{image}: no caption file {image.with_suffix(subset.caption_extension).name} "
                        "(strict_captions is on)"
                    )
                missing.append(f"{image} (caption {subset.class_tokens!r})")
                caption = subset.class_tokens
            records += [Record(str(image), (caption,), i)] * subset.num_repeats
    if missing:
        more = f"; ... {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
        logger.warning(
            "%d images have no caption file and train on their folder's class tokens: %s%s",
            len(missing),
            "; ".join(missing[:_SHOWN]),
            more,
        )
    return records


@dataclass(frozen=True)
class FolderOptions:
    """How the training data is found: a dataset config, or a data folder's layout and caption files."""

    dataset_config: str = ""
    caption_extension: str = ".txt"
    strict_captions: bool = False
    is_reg: bool | None = None  # a dataset config's subsets to read: None all (none may be is_reg), else those


def read_records(data_path, folder: FolderOptions, rules: CaptionRules) -> tuple[str, list[Record], list]:
    """``(what was read, records, caption rules per subset)`` for a dataset config, an index file (one subset, the
    training options' rules) or a kohya folder."""
    if folder.dataset_config:
        config = read_dataset_config(folder.dataset_config, folder.caption_extension, rules)
        subsets = list(config.subsets)
        keep = {i for i, s in enumerate(subsets) if folder.is_reg is None or s.is_reg == folder.is_reg}
        reg = [i for i, s in enumerate(subsets) if s.is_reg]
        if folder.is_reg is None and reg:
            raise ValueError(
                f"{config.path}: datasets[0].subsets[{reg[0]}] has is_reg = true: class images train only with "
                "with_prior_preservation (DreamBooth's prior loss)"
            )
        if not keep:
            kind = "an is_reg = true subset (the class images)" if folder.is_reg else "a subset of instance images"
            raise ValueError(f"{config.path}: with_prior_preservation needs {kind}; there is none")
        return config.path, subset_records(subsets, folder.strict_captions, keep), [s.rules for s in subsets]
    root = os.fspath(data_path)
    if not os.path.isdir(root):
        raise ValueError(f"{root}: data path is not a directory")
    if os.path.isfile(os.path.join(root, CSV_INDEX)) or os.path.isfile(os.path.join(root, JSONL_INDEX)):
        index, records = read_index(root)
        return index, records, [rules]
    subsets = folder_subsets(root, folder.caption_extension, rules)
    return root, subset_records(subsets, folder.strict_captions), [s.rules for s in subsets]
