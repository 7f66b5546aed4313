"""The predictions file: one study per line of JSON, what evaluate.py writes and scores.

    {"id", "reference", "generated", "report", "report_labels", "reference_labels"}

Only "id", "reference" and "generated" (the full completion) or "report" (the text inside
<report>) are required, so other systems' outputs are scored the same way. Labels are 14 CheXbert
codes in mrgr1.labels.CONDITIONS order (0 blank, 1 positive, 2 negative, 3 uncertain). The file is
appended batch by batch (`append_records`), so an interrupted evaluation continues where it stopped.
"""
from __future__ import annotations

import json
import os

from .labels import CONDITIONS
from .rewards import extract_report


class PredictionsError(ValueError):
    """A predictions file that cannot be read as one; the message names the file and line."""


def check_labels(value, where: str) -> list[int]:
    if (not isinstance(value, list) or len(value) != len(CONDITIONS)
            or not all(isinstance(c, int) and 0 <= c <= 3 for c in value)):
        raise PredictionsError(f"{where}: labels must be a list of {len(CONDITIONS)} CheXbert codes 0-3 "
                        f"(columns in mrgr1.labels.CONDITIONS order), got {value!r}")
    return value


def check_record(record, where: str) -> dict:
    """One predictions line: id, reference, generated and/or report; labels optional."""
    if not isinstance(record, dict):
        raise PredictionsError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "id" not in record or not isinstance(record.get("reference"), str):
        raise PredictionsError(f"{where}: needs \"id\" and a \"reference\" string")
    if not any(isinstance(record.get(k), str) for k in ("generated", "report")):
        raise PredictionsError(f"{where}: needs a \"generated\" (full completion) or \"report\" string")
    for key in ("report_labels", "reference_labels"):
        if key in record:
            check_labels(record[key], f"{where}, \"{key}\"")
    record["id"] = str(record["id"])
    if "report" not in record:
        record["report"] = extract_report(record["generated"])
    return record


def read_predictions(path: str, *, drop_partial_tail: bool = False) -> list[dict]:
    """Records of a predictions .jsonl; errors name the file and line.

    drop_partial_tail (resume): a last line without its newline is what an interrupted write
    leaves; it is cut from the file (that study is generated again) instead of being an error.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if drop_partial_tail and raw and not raw.endswith(b"\n"):
        keep = raw.rfind(b"\n") + 1
        print(f"{path}: dropping an incomplete last line (interrupted write); it is generated again")
        with open(path, "r+b") as f:
            f.truncate(keep)
        raw = raw[:keep]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PredictionsError(f"{path}: not UTF-8 text (byte {e.start}); a predictions file is JSON lines") from e
    records, line_of = [], {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            record = check_record(json.loads(line), where)
        except json.JSONDecodeError as e:
            raise PredictionsError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); fix or delete the line") from e
        if record["id"] in line_of:
            raise PredictionsError(f"{where}: id {record['id']!r} already on line {line_of[record['id']]}; "
                            "each study may appear once")
        line_of[record["id"]] = n
        records.append(record)
    return records


def append_records(path: str, records: list[dict]) -> None:
    """One write per batch, flushed to disk: a crash loses at most the batch being written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
