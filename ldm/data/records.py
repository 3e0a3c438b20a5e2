"""Index files of an image-caption folder: MindONE's ``img_txt.csv`` and diffusers' ``metadata.jsonl``.

A folder with neither, or both, is an error naming the folder; malformed or empty index files are errors naming file
and line. (A folder of images with caption sidecars, kohya's layout, is read by :mod:`ldm.data.kohya`.)
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass

from ldm.util import read_text_utf8

CSV_INDEX = "img_txt.csv"
JSONL_INDEX = "metadata.jsonl"


@dataclass(frozen=True)
class Record:
    """One training pair: an image path, one or more captions (one is drawn per visit) and the index of the subset
    whose caption rules apply (0 for an index file)."""

    path: str
    captions: tuple[str, ...]
    subset: int = 0


def _read_csv(path: str, root: str) -> list[Record]:
    with io.StringIO(read_text_utf8(path), newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or not any(cell.strip() for cell in header):
            raise ValueError(f"{path}: empty index file, expected a header 'dir,text'")
        header = [cell.strip() for cell in header]
        if "dir" not in header or "text" not in header:
            raise ValueError(f"{path}:1: header must have columns 'dir' and 'text', got {header}")
        i_dir, i_text = header.index("dir"), header.index("text")
        records = []
        for row in reader:
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{reader.line_num}: expected {len(header)} fields, got {len(row)}")
            rel = row[i_dir].strip()
            if not rel:
                raise ValueError(f"{path}:{reader.line_num}: empty 'dir'")
            records.append(Record(os.path.join(root, rel), (row[i_text],)))
    if not records:
        raise ValueError(f"{path}: no rows after the header")
    return records


def _read_jsonl(path: str, root: str) -> list[Record]:
    records = []
    with io.StringIO(read_text_utf8(path)) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
            if not isinstance(item, dict) or "file_name" not in item or "text" not in item:
                raise ValueError(f"{path}:{line_no}: expected an object with 'file_name' and 'text'")
            text = item["text"]
            captions = tuple(text) if isinstance(text, list) else (text,)
            if not captions or not all(isinstance(c, str) for c in captions):
                raise ValueError(f"{path}:{line_no}: 'text' must be a string or a non-empty list of strings")
            records.append(Record(os.path.join(root, str(item["file_name"])), captions))
    if not records:
        raise ValueError(f"{path}: empty index file")
    return records


def read_index(data_path) -> tuple[str, list[Record]]:
    """Detect the layout of ``data_path`` and read its index: ``(index file, records)`` (images not checked)."""
    root = os.fspath(data_path)
    if not os.path.isdir(root):
        raise ValueError(f"{root}: data path is not a directory")
    csv_path, jsonl_path = os.path.join(root, CSV_INDEX), os.path.join(root, JSONL_INDEX)
    has_csv, has_jsonl = os.path.isfile(csv_path), os.path.isfile(jsonl_path)
    if has_csv and has_jsonl:
        raise ValueError(f"{root}: has both {CSV_INDEX} and {JSONL_INDEX}; keep one")
    if has_csv:
        return csv_path, _read_csv(csv_path, root)
    if has_jsonl:
        return jsonl_path, _read_jsonl(jsonl_path, root)
    raise ValueError(
        f"{root}: no {CSV_INDEX} (MindONE layout, columns dir,text) or {JSONL_INDEX} "
        "(diffusers imagefolder, fields file_name,text) found"
    )
