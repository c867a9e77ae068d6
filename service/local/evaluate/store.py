"""``results.jsonl``: the results of ``gradcam-service evaluate``, appended after each batch of
images, and read back by the next run of the same configuration, which carries on from them.

The first line is the configuration; each further line a record (one map of one image,
measured) or an image that could not be used. An image is done once every (layer, method) has
its record; images that failed are tried again; an unfinished last line (the process killed,
the disk full) is dropped; damage anywhere else stops the command.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from service.local.files import CommandError

RESULTS_FILE = "results.jsonl"


@dataclass
class Record:
    """One map of one image, measured."""

    image: str
    index: int  # position of the image in the folder's sorted listing
    layer: str
    method: str
    target: int
    label: str
    probability: float
    pointing: bool | None
    energy: float | None
    scores: dict[str, float]
    explain_ms: float  # after a warm-up call (its one-time costs are not counted)
    scores_ms: float
    cropped: bool = False  # part of the image was cut away before the model saw it


def _entry(line: bytes, first: bool) -> dict[str, Any]:
    """One line of ``results.jsonl``: the configuration (the first line), a failed image, or a
    record (checked here, so that a damaged line is told apart from a usable one); else
    ValueError."""
    entry = json.loads(line)
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    if first:
        if "config" not in entry:
            raise ValueError("no configuration")
    elif "error" in entry:
        if not (isinstance(entry.get("image"), str) and isinstance(entry["error"], str)):
            raise ValueError("not a failed image")
    else:
        try:
            Record(**entry)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
    return entry


@dataclass
class Run:
    """The state of one evaluation: what is done, and where it is written."""

    output: Path
    config: dict[str, Any]
    pairs: frozenset[tuple[str, str]]  # every (layer, method) an image needs to be done
    records: list[Record] = field(default_factory=list)  # of done images only
    failed: dict[str, str] = field(default_factory=dict)  # image -> why it was skipped

    @property
    def results(self) -> Path:
        return self.output / RESULTS_FILE

    def done(self) -> set[str]:
        """The images with a record for every (layer, method); failed ones are tried again."""
        return {r.image for r in self.records}

    def resume(self, fresh: bool, names: Sequence[str]) -> None:
        """Load the results of an earlier run of the same configuration for the images
        ``names``. Only images with every (layer, method) recorded count as done: Ctrl-C can
        stop a batch's lines half written, and the records of such an image are left out
        (it is done again) rather than counted twice. An unfinished last line (the process
        killed, the disk full) is dropped from the file, so that the next lines start on
        their own; damage anywhere else stops the command."""
        lines = self._read_lines() if not fresh and self.results.exists() else []
        if not lines:
            self.output.mkdir(parents=True, exist_ok=True)
            self.results.write_text(json.dumps({"config": self.config}) + "\n")
            return
        if lines[0].get("config") != self.config:
            raise CommandError(
                f"{self.results} holds the results of another configuration (model, folder,"
                " layers, methods, scores or labels); use --fresh to start over, or another"
                " --output folder."
            )
        by_image: dict[str, dict[tuple[str, str], Record]] = {}
        failed: dict[str, str] = {}
        for entry in lines[1:]:  # the latest result of an image wins
            if "error" in entry:
                failed[entry["image"]] = entry["error"]
                by_image.pop(entry["image"], None)
            else:
                record = Record(**entry)
                failed.pop(record.image, None)
                by_image.setdefault(record.image, {})[(record.layer, record.method)] = record
        for name in names:
            mine = by_image.get(name, {})
            if self.pairs <= mine.keys():
                self.records += [mine[pair] for pair in sorted(self.pairs)]
            elif name in failed:
                self.failed[name] = failed[name]

    def _read_lines(self) -> list[dict[str, Any]]:
        """The entries of ``results.jsonl``, less an unusable last line, dropped from the
        file too (said on stderr); a CommandError for an unusable line elsewhere."""
        data = self.results.read_bytes()
        lines = data.splitlines(keepends=True)
        entries: list[dict[str, Any]] = []
        for number, line in enumerate(lines, 1):
            try:
                entries.append(_entry(line, first=number == 1))
            except ValueError as exc:
                if number < len(lines):
                    raise CommandError(
                        f"{self.results}, line {number}: damaged ({exc}); use --fresh to start"
                        " over."
                    ) from None
                kept = len(data) - len(line)
                with self.results.open("r+b") as out:
                    out.truncate(kept)
                print(
                    f"warning: {self.results}: dropped its unfinished last line (line {number},"
                    f" {exc}); what it held is evaluated again",
                    file=sys.stderr,
                )
        if lines and not data.endswith(b"\n") and len(entries) == len(lines):
            with self.results.open("ab") as out:  # a whole last line but for its end
                out.write(b"\n")
        return entries

    def append(self, records: list[Record], failed: dict[str, str]) -> None:
        """Add a batch's results, on disk first, in one write: a batch stopped half way
        leaves its images without every record, and they are done again on resume."""
        lines = [json.dumps({"image": image, "error": why}) + "\n" for image, why in failed.items()]
        lines += [json.dumps(asdict(record)) + "\n" for record in records]
        with self.results.open("a", encoding="utf-8") as out:
            out.write("".join(lines))
            out.flush()
        self.records.extend(records)
        self.failed.update(failed)
        for record in records:
            self.failed.pop(record.image, None)
