"""Per-step metrics to JSONL and CSV (one row a step), held-out evaluations to eval.jsonl."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

STEP_FIELDS = ["step", "loss", "lm_loss", "ce", "kl", "l1", "lambda", "lambda_l1", "lr", "sparsity",
               "grad_norm", "tokens", "tokens_per_s", "step_s", "epoch"]


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file; a last line cut short by a kill is ignored."""
    if not path.is_file():
        return []
    rows = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if line.endswith("\n"):
                    raise
    return rows


class MetricsLog:
    """Appends to ``metrics.jsonl``, ``metrics.csv`` and ``eval.jsonl`` in the run folder.
    ``truncate(step)`` drops rows after ``step`` (a resumed run rewrites what follows)."""

    def __init__(self, run_dir: Path):
        self.steps_jsonl = run_dir / "metrics.jsonl"
        self.steps_csv = run_dir / "metrics.csv"
        self.evals = run_dir / "eval.jsonl"

    def truncate(self, step: int) -> None:
        for path in (self.steps_jsonl, self.evals):
            rows = [r for r in read_jsonl(path) if r["step"] <= step]
            self._rewrite(path, [json.dumps(r) for r in rows])
        rows = [r for r in read_jsonl(self.steps_jsonl)]
        self._rewrite_csv(rows)

    def _rewrite(self, path: Path, lines: list[str]) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, path)

    def _rewrite_csv(self, rows: list[dict]) -> None:
        tmp = self.steps_csv.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, STEP_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.steps_csv)

    def step(self, row: dict) -> None:
        with open(self.steps_jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        new = not self.steps_csv.is_file()
        with open(self.steps_csv, "a", newline="") as f:
            writer = csv.DictWriter(f, STEP_FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def eval(self, row: dict) -> None:
        with open(self.evals, "a") as f:
            f.write(json.dumps(row) + "\n")
