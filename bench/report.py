"""Turns the benchmark's samples into one table: each figure the median of its runs with
its spread, each comparison the median of ratios taken within the same run.

A sample is one measured value:
  section, measure, unit, better ("higher", "lower" or None),
  subject  who was measured: a baseline ("floor", "identity", "GenerateRandom", "local-kms", "alone": the
           flood section's callers without the flood), "aesgcm",
           "reference" (the Go reference plugin) or "kubekms"
  run      which repetition (ratios pair values of the same run)
  base     the baseline's value measured with it in the same run (None for a baseline, or
           where there is no baseline)
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

BASELINES = ("floor", "identity", "GenerateRandom", "local-kms", "alone")
COLUMNS = ("aesgcm", "reference", "kubekms")
COLUMN_TITLES = {"aesgcm": "aesgcm", "reference": "Go reference", "kubekms": "kubekms"}


def summary(values: list[float]) -> dict:
    """Median, range and the values themselves."""
    if not values:
        raise ValueError("no values to summarise")
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values), "runs": values}


def aggregate(samples: list[dict], section_order: tuple[str, ...] = ()) -> list[dict]:
    """One row per (section, measure): sections in `section_order` (others after them), and
    within a section the measures in the order they were first taken."""
    rows: dict[tuple[str, str], dict] = {}
    for s in samples:
        key = (s["section"], s["measure"])
        row = rows.setdefault(key, {"section": s["section"], "measure": s["measure"], "unit": s["unit"],
                                    "better": s.get("better"), "baseline": None, "samples": []})
        if s["subject"] in BASELINES:
            if row["baseline"] not in (None, s["subject"]):
                raise ValueError(f"{key}: two baselines, {row['baseline']} and {s['subject']}")
            row["baseline"] = s["subject"]
        row["samples"].append(s)

    out = []
    for row in rows.values():
        samples_ = row.pop("samples")
        by_subject: dict[str, list[dict]] = {}
        for s in samples_:
            by_subject.setdefault(s["subject"], []).append(s)
        row["values"] = {subj: summary([s["value"] for s in ss]) for subj, ss in by_subject.items()}
        row["ratio_to_baseline"] = {}
        for subj, ss in by_subject.items():
            ratios = [s["value"] / s["base"] for s in ss if s.get("base")]
            if subj not in BASELINES and ratios:
                row["ratio_to_baseline"][subj] = summary(ratios)
        # kubekms ÷ reference, paired by run.
        ref = {s["run"]: s["value"] for s in by_subject.get("reference", [])}
        pairs = [s["value"] / ref[s["run"]] for s in by_subject.get("kubekms", []) if ref.get(s["run"])]
        row["kubekms_to_reference"] = summary(pairs) if pairs else None
        out.append(row)
    rank = {name: i for i, name in enumerate(section_order)}
    return sorted(out, key=lambda row: rank.get(row["section"], len(rank)))  # stable


def fmt(x: float) -> str:
    """A number with about three significant digits and thousands separators."""
    a = abs(x)
    if a >= 100:
        return f"{x:,.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def spread(s: dict) -> str:
    """The half-range as a percentage of the median (nothing for a single run)."""
    if s["n"] < 2 or s["median"] == 0:
        return ""
    return f" ±{(s['max'] - s['min']) / 2 / abs(s['median']) * 100:.0f}%"


def cell(row: dict, subject: str) -> str:
    v = row["values"].get(subject)
    if v is None:
        return "–"
    text = fmt(v["median"]) + spread(v)
    r = row["ratio_to_baseline"].get(subject)
    if r is not None:
        text += f" (×{r['median']:.2f})"
    return text


def ratio_cell(r: dict | None) -> str:
    if r is None:
        return "–"
    if r["n"] < 2:
        return f"{r['median']:.2f}"
    return f"{r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f})"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# kubekms benchmark ({meta.get('mode', 'full')})", ""]
    for key, value in meta.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k.replace('_', ' ')} {v:,}" if isinstance(v, int) else f"{k} {v}"
                              for k, v in value.items())
        if key != "mode":
            lines.append(f"- {key}: {value}")
    lines += [
        "",
        "Each figure is the median of its runs, ±half its range; (×r) is the median of the ratios to the",
        "row's baseline measured in the same run; the last column is kubekms ÷ Go reference, paired by run",
        "(median and range). ↑ higher is better, ↓ lower is better. Benchmarks report; they do not pass or fail.",
        "",
        "| section | measure | baseline | aesgcm | Go reference | kubekms | kubekms ÷ Go ref |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        arrow = {"higher": " ↑", "lower": " ↓"}.get(row["better"] or "", "")
        base = row["baseline"]
        base_cell = "–"
        if base is not None:
            b = row["values"][base]
            base_cell = f"{base}: {fmt(b['median'])}{spread(b)}"
        lines.append(
            f"| {row['section']} | {row['measure']} ({row['unit']}){arrow} | {base_cell} | "
            + " | ".join(cell(row, c) for c in COLUMNS)
            + f" | {ratio_cell(row['kubekms_to_reference'])} |"
        )
    return "\n".join(lines) + "\n"


def write(out_dir: Path, name: str, rows: list[dict], meta: dict, samples: list[dict],
          details: dict | None = None) -> tuple[Path, Path]:
    """Writes NAME.md (the table) and NAME.json (the table's rows with every run's value,
    the raw samples and `details`) into out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{name}.md", out_dir / f"{name}.json"
    md.write_text(markdown(rows, meta))
    js.write_text(json.dumps({"meta": meta, "details": details or {}, "rows": rows, "samples": samples},
                             indent=2, ensure_ascii=False) + "\n")
    return md, js
