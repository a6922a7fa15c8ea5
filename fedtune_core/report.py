"""What the reports say: their header, tidy frames from records, the paper's findings.

Everything here reads run records only (the config inside each record), never file names.
"""

from __future__ import annotations

import html
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fedtune_core import models, results, verdicts
from fedtune_core.profile import Profile

NOT_MEASURABLE_HERE = "not measurable in this profile"
MODE_NAMES = {"fl": "FedAvg", "local": "local only", "central": "centralised"}
NOTEBOOKS = {
    "00_summary": "Summary: the paper's findings",
    "01_tuning_methods": "Tuning methods compared",
    "02_clip_vs_vit": "CLIP vs ViT",
    "03_few_shot": "Few-shot",
    "04_fl_vs_local": "FL vs local training",
}


def results_path(profile: Profile, results_root: str | os.PathLike) -> Path:
    """``<results_root>/<profile name>``."""
    return Path(results_root) / profile.name


def frames(records: Sequence[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, rounds) frames of the finished records, with derived columns.

    Derived: ``family`` (CLIP or ViT), ``shots`` (K of fewshot:K), ``communication``
    (bytes up + down over the run), ``mode_name``, ``setting`` ("model / variant").
    """
    ok = [r for r in records if r.get("status") == "ok"]
    runs, rounds = results.runs_frame(ok), results.rounds_frame(ok)
    for frame in (runs, rounds):
        if frame.empty:
            continue
        frame["family"] = frame["model"].map(family)
        frame["shots"] = frame["partition"].map(_shots)
        frame["setting"] = frame["model"] + " / " + frame["variant"]
        frame["mode_name"] = frame["mode"].map(MODE_NAMES)
    if not runs.empty:
        runs["communication"] = runs["final_bytes_up"] + runs["final_bytes_down"]
    return runs, rounds


def family(model: str) -> str:
    """CLIP for open_clip backbones, ViT for timm ones."""
    return "CLIP" if models.BACKBONES[model].family == "open_clip" else "ViT"


def _shots(spec: str) -> float:
    from fedtune_core import partition

    parsed = partition.parse(spec)
    return float(parsed.value) if parsed.kind == "fewshot" else float("nan")


def client_class_counts(config: dict, clients: int = 10,
                        data_root: str | None = None) -> pd.DataFrame:
    """Client x class training-image counts of a record's partition (first ``clients`` rows)."""
    from fedtune_core import data, partition

    dataset = data.load(config["dataset"], data_root)
    split = partition.split_clients(dataset.train.labels.numpy(), config["partition"],
                                    config["clients"], config["seed"],
                                    config["local_test_fraction"], len(dataset.class_names))
    table = partition.count_table(dataset.train.labels.numpy(), split.train,
                                  dataset.class_names)
    return table.head(clients)


def header(profile: Profile, records: Sequence[dict]) -> str:
    """Markdown block that opens every report: profile, models, data, seeds, provenance."""
    ok = [r for r in records if r.get("status") == "ok"]
    bad = len(records) - len(ok)
    weights = sorted({f"{r['config']['model']} ({_weights(r)})" for r in ok})
    datasets = sorted({r["config"]["dataset"] for r in ok})
    seeds = sorted({r["seed"] for r in ok})
    commits = Counter(f"{(r.get('git') or {}).get('commit') or 'unknown'}"[:10]
                      + (" (dirty)" if (r.get("git") or {}).get("dirty") else "") for r in ok)
    devices = Counter(f"{r.get('device')} / {(r.get('hardware') or {}).get('gpu') or 'no GPU'}"
                      for r in ok)
    versions = ok[0]["versions"] if ok else {}
    lines = [f"**Profile: `{profile.name}`.** {profile.description}", "",
             "| | |", "|---|---|",
             f"| models (weights) | {', '.join(weights) or '-'} |",
             f"| dataset | {', '.join(datasets) or '-'} |",
             f"| seeds | {len(seeds)} ({', '.join(map(str, seeds))}) |",
             f"| runs | {len(ok)} finished" + (f", **{bad} failed**" if bad else "") + " |",
             *([f"| failed runs (in no figure, table or verdict) | {failed_runs(records)} |"]
               if bad else []),
             f"| versions | {', '.join(f'{k} {v}' for k, v in versions.items() if v)} |",
             f"| commit | {', '.join(f'{c} ({n} runs)' for c, n in commits.items()) or '-'} |",
             f"| hardware | {', '.join(f'{d} ({n} runs)' for d, n in devices.items()) or '-'} |"]
    return "\n".join(lines)


def failed_runs(records: Sequence[dict], shown: int = 10) -> str:
    """The failed runs among ``records``, one short phrase each (their error included)."""
    bad = [r for r in records if r.get("status") != "ok"]
    phrases = []
    for r in bad[:shown]:
        c = r["config"]
        setting = f"{c['model']} / {results.method_label(c)}, {c['partition']}, {c['mode']}"
        phrases.append(f"`{r['hash']}` ({setting}, seed {c['seed']}): "
                       f"{(r.get('error') or 'unknown error').splitlines()[0]}")
    more = f"; and {len(bad) - shown} more" if len(bad) > shown else ""
    return "; ".join(phrases).replace("|", "\\|") + more


def _weights(record: dict) -> str:
    w = record.get("weights") or {}
    if w.get("kind") == "none":
        return "random init, untrained"
    if w.get("kind") == "file":
        return f"checkpoint {Path(w['source']).name}"
    return f"pre-trained: {w.get('source')}"


def findings(profile: Profile, records_by_experiment: dict[str, Sequence[dict]]) -> pd.DataFrame:
    """The paper's findings with this run's evidence and a verdict (see :mod:`verdicts`).

    A profile whose models are not pre-trained cannot test claims about pre-trained
    models: its verdicts are 'not measurable in this profile', and the evidence column
    still shows what its runs computed (a check of the pipeline, not of the paper).
    """
    rows = []
    for key, claim, experiment, test, report_name in verdicts.FINDINGS:
        runs, rounds = frames(records_by_experiment.get(experiment, []))
        verdict, evidence = (test(runs, rounds) if not runs.empty
                             else (verdicts.NOT_MEASURABLE, "no finished runs"))
        if not profile.pretrained and verdict != verdicts.NOT_MEASURABLE:
            evidence = f"pipeline check only, untrained models: {evidence}"
            verdict = verdicts.NOT_MEASURABLE
        if verdict == verdicts.NOT_MEASURABLE:
            verdict = NOT_MEASURABLE_HERE
        bad = sum(r.get("status") != "ok" for r in records_by_experiment.get(experiment, []))
        if bad:
            evidence = f"{evidence} ({bad} failed run(s) left out, see the report)"
        rows.append({"finding": key, "claim": claim, "verdict": verdict, "evidence": evidence,
                     "report": report_name})
    return pd.DataFrame(rows)


def findings_markdown(table: pd.DataFrame) -> str:
    """The findings table as Markdown, each row linking to its report."""
    lines = ["| finding | claim | verdict | evidence | report |", "|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.finding} | {r.claim} | **{r.verdict}** | {r.evidence} | "
                     f"[{r.report}]({r.report}.html) |")
    return "\n".join(lines)


def write_index(folder: str | os.PathLike, profile: Profile, table: pd.DataFrame) -> Path:
    """``<folder>/index.html``: the findings table and links to every report and figure."""
    folder = Path(folder)
    links = "".join(f'<li><a href="reports/{n}.html">{html.escape(t)}</a></li>'
                    for n, t in NOTEBOOKS.items() if (folder / "reports" / f"{n}.html").exists())
    figures = "".join(f'<li><a href="figures/{p.name}">{p.name}</a></li>'
                      for p in sorted((folder / "figures").glob("*.png")))
    shown = table.assign(report=[f'<a href="reports/{r}.html">{r}</a>' for r in table["report"]])
    body = (f"<h1>fedtune: results of profile <code>{profile.name}</code></h1>"
            f"<p>{html.escape(profile.description)}</p>"
            f"<h2>The paper's findings</h2>{shown.to_html(index=False, escape=False)}"
            f"<h2>Reports</h2><ul>{links}</ul><h2>Figures</h2><ul>{figures}</ul>")
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;"
             "text-align:left;vertical-align:top}")
    path = folder / "index.html"
    results.write_text(path, f"<!doctype html><html><head><meta charset='utf-8'>"
                             f"<title>fedtune {profile.name}</title><style>{style}</style>"
                             f"</head><body>{body}</body></html>")
    return path
