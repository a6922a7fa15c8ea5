"""What the reports say: their header, tidy frames from records, the paper's findings.

Everything here reads run records only (the config inside each record), never file names.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fedtune_core import specs
from fedtune_core.study import tidy, verdicts
from fedtune_core.study.lr_report import lr_choices as lr_choices  # re-exported for the notebooks
from fedtune_core.study.lr_report import lr_cost as lr_cost
from fedtune_core.study.lr_report import lr_sweeps as lr_sweeps
from fedtune_core.study.profile import Profile
from fedtune_core.study.strong import strong_choices as strong_choices  # for the notebooks

NOT_MEASURABLE_HERE = "not measurable in this profile"
EFFECT = "effect"  # the findings' column: per setting, mean [95% interval], seeds, resolution
# A verdict's mark: (symbol, CSS class); shown with the verdict's words, so never by colour alone.
VERDICT_MARKS: dict[str, tuple[str, str]] = {
    verdicts.SUPPORTED: ("✔", "supported"),
    verdicts.NOT_SUPPORTED: ("✘", "not-supported"),
    verdicts.INCONCLUSIVE: ("≈", "inconclusive"),
    verdicts.NOT_MEASURABLE: ("–", "not-measurable"),
    NOT_MEASURABLE_HERE: ("–", "not-measurable"),
}
OTHER_MARK = ("•", "other")  # a verdict this table does not know yet
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
    (bytes up + down over the run), ``mode_name``, ``setting`` ("model / variant"), and
    ``checkpoint``: the weights as a reader names them ("random init", a recipe without
    its hash, a tag or file), ordered by pre-training steps (random init first).
    """
    ok = [r for r in records if r.get("status") == "ok"]
    runs, rounds = tidy.runs_frame(ok), tidy.rounds_frame(ok)
    names = {r["config"]["weights"]: _checkpoint(r) for r in ok}
    scores = {(r["config"]["model"], r["config"]["weights"]): _val_score(r) for r in ok}
    order = list(dict.fromkeys(n for n, _ in sorted(set(names.values()),
                                                    key=lambda t: (t[1], t[0]))))
    for frame in (runs, rounds):
        if frame.empty:
            continue
        frame["checkpoint"] = pd.Categorical(frame["weights"].map(lambda w: names[w][0]),
                                             categories=order)
        frame["checkpoint_steps"] = frame["weights"].map(lambda w: names[w][1])
        frame["checkpoint_val"] = pd.Series(
            [scores.get(k) for k in zip(frame["model"], frame["weights"], strict=True)],
            index=frame.index, dtype=float)
        frame["family"] = frame["model"].map(family)
        frame["shots"] = frame["partition"].map(_shots)
        frame["setting"] = frame["model"] + " / " + frame["variant"]
        frame["mode_name"] = frame["mode"].map(MODE_NAMES)
    if not runs.empty:
        runs["communication"] = runs["final_bytes_up"] + runs["final_bytes_down"]
    return runs, rounds


def _val_score(record: dict) -> float | None:
    """The probe's cross-validated accuracy of a record's checkpoint: from its ``weights``
    entry, else (records written before the entry held it) from the checkpoint's sidecar."""
    w = record.get("weights") or {}
    if w.get("probe_val_acc") is not None or w.get("kind") != "recipe" or not w.get("path"):
        return w.get("probe_val_acc")
    try:
        meta = json.loads(Path(w["path"]).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return meta.get("probe_val_acc") if meta.get("hash") == w.get("hash") else None


def _checkpoint(record: dict) -> tuple[str, float]:
    """(display name, pre-training steps) of a record's weights; random init: 0 steps."""
    w = record.get("weights") or {}
    if w.get("kind") == "none":
        return "random init", 0.0
    if w.get("kind") == "recipe":
        return str(w.get("recipe")), float(w.get("steps") or 0)
    return specs.split_id(str(record["config"]["weights"]))[0], float("inf")


def family(model: str) -> str:
    """CLIP for open_clip backbones, ViT for timm ones."""
    return "CLIP" if specs.BACKBONES[model].family == "open_clip" else "ViT"


def _shots(spec: str) -> float:
    from fedtune_core.fl import partition

    parsed = partition.parse(spec)
    return float(parsed.value) if parsed.kind == "fewshot" else float("nan")


def client_class_counts(config: dict, clients: int = 10,
                        data_root: str | None = None) -> pd.DataFrame:
    """Client x class training-image counts of a record's partition (first ``clients`` rows)."""
    from fedtune_core.fl import data, partition

    dataset = data.load(config["dataset"], data_root)
    split = partition.split_clients(dataset.train.labels.numpy(), config["partition"],
                                    config["clients"], config["seed"],
                                    config["local_test_fraction"], len(dataset.class_names))
    table = partition.count_table(dataset.train.labels.numpy(), split.train,
                                  dataset.class_names)
    return table.head(clients)


def header(profile: Profile, records: Sequence[dict]) -> str:
    """Markdown block that opens every report: profile, models, data, seeds, provenance.

    Records from :func:`fedtune_core.study.grid.collect` (or ``ensure``) know which planned runs
    have no valid record: the block then opens with :func:`absent_notice`.
    """
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
    notice = absent_notice(getattr(records, "absent", ()))
    lines = [*([f"**REHEARSAL of profile `{profile.rehearsal.get('of')}`: every run shape "
                 "once, tiny, to find what breaks before the real runs; its numbers are no "
                 "results.**", ""] if profile.rehearsal else []),
             f"**Profile: `{profile.name}`.** {profile.description}", "",
             *([notice, ""] if notice else []),
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


def absent_notice(absent: Sequence[tuple], shown: int = 10) -> str:
    """Markdown naming the planned runs without a valid record ('' if none): what is on
    the page was computed without them, so every verdict of their experiment is
    incomplete."""
    if not absent:
        return ""
    phrases = []
    for cfg, why in absent[:shown]:
        c = cfg.to_dict()
        phrases.append(f"`{cfg.hash}` ({c['model']} / {tidy.method_label(c)}, "
                       f"{c['partition']}, {c['mode']}, seed {c['seed']}: {why})")
    more = f"; and {len(absent) - shown} more" if len(absent) > shown else ""
    return (f"**Incomplete: {len(absent)} planned run(s) have no valid record**, so the "
            "tables, figures and verdicts that would use them are incomplete: "
            + "; ".join(phrases).replace("|", "\\|") + more
            + ". Run `fedtune grid` (or `./run_all.sh`) to compute them.")


def failed_runs(records: Sequence[dict], shown: int = 10) -> str:
    """The failed runs among ``records``, one short phrase each (their error included)."""
    bad = [r for r in records if r.get("status") != "ok"]
    phrases = []
    for r in bad[:shown]:
        c = r["config"]
        setting = f"{c['model']} / {tidy.method_label(c)}, {c['partition']}, {c['mode']}"
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
    if w.get("kind") == "recipe":
        return (f"pre-trained offline: {w.get('recipe')} {w.get('hash')}, "
                f"{w.get('steps', 0):,} steps")
    return f"pre-trained: {w.get('source')}"


def proxy_quality(records: Sequence[dict]) -> pd.DataFrame:
    """One row per pre-trained checkpoint the records used: what it is and how good it is.

    Read from the records' ``weights`` entries (written when the checkpoint was built):
    recipe, hash, steps, image passes, accuracy on held-out pre-training images, and on
    the downstream digits a linear probe of the frozen features and (CLIP) zero-shot.
    """
    rows = {}
    for rec in records:
        w = rec.get("weights") or {}
        if rec.get("status") != "ok" or w.get("kind") != "recipe":
            continue
        rows[(rec["config"]["model"], w.get("recipe"), w.get("hash"))] = {
            "model": rec["config"]["model"], "checkpoint": w.get("recipe"),
            "hash": w.get("hash"), "steps": w.get("steps"),
            "image passes": w.get("image_passes"),
            "pre-training accuracy (held-out glyphs)": w.get("pretrain_acc"),
            "digits linear probe": w.get("probe_acc"),
            "digits zero-shot": w.get("zeroshot_acc")}
    return pd.DataFrame(sorted(rows.values(), key=lambda r: (r["model"], r["steps"] or 0)))


def samples_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Samples processed per run and per client, by setting and mode (mean over seeds).

    Local-only clients train in exactly the rounds FedAvg samples them and central
    training processes FedAvg's samples, so the three modes' totals agree.
    """
    keys = ["model", "variant", "partition", "mode_name"]
    frame = runs.assign(per_client=runs["final_samples_processed"] / runs["clients"],
                        spread=runs["final_samples_per_client"].map(
                            lambda n: f"{min(n):,}-{max(n):,}"))
    table = frame.groupby(keys, sort=False).agg(
        samples=("final_samples_processed", "mean"), per_client=("per_client", "mean"),
        per_client_range=("spread", "first"))
    return table.rename(columns={"per_client": "per client (mean)",
                                 "per_client_range": "per client (min-max, first seed)"})


def findings(profile: Profile, records_by_experiment: dict[str, Sequence[dict]]) -> pd.DataFrame:
    """The paper's findings with this run's evidence and a verdict (see :mod:`verdicts`).

    A profile whose models are not pre-trained cannot test claims about pre-trained
    models: its verdicts are 'not measurable in this profile', and the evidence column
    still shows what its runs computed (a check of the pipeline, not of the paper).
    """
    rows = []
    for key, claim, experiment, test, report_name in verdicts.FINDINGS:
        runs, rounds = frames(records_by_experiment.get(experiment, []))
        verdict, evidence, effect = (test(runs, rounds) if not runs.empty
                                     else (verdicts.NOT_MEASURABLE, "no finished runs", ""))
        if not profile.pretrained and verdict != verdicts.NOT_MEASURABLE:
            evidence = f"pipeline check only, untrained models: {evidence}"
            verdict, effect = verdicts.NOT_MEASURABLE, ""
        if verdict == verdicts.NOT_MEASURABLE:
            verdict = NOT_MEASURABLE_HERE
        bad = sum(r.get("status") != "ok" for r in records_by_experiment.get(experiment, []))
        if bad:
            evidence = f"{evidence} ({bad} failed run(s) left out, see the report)"
        if missing := len(getattr(records_by_experiment.get(experiment), "absent", ())):
            evidence = f"{evidence} (incomplete: {missing} planned run(s) absent)"
        rows.append({"finding": key, "claim": claim, "verdict": verdict,
                     EFFECT: effect.replace("; ", "\n") or "-", "evidence": evidence,
                     "report": report_name})
    return pd.DataFrame(rows)


def mark(verdict: str) -> tuple[str, str]:
    """(symbol, CSS class) of a verdict; :data:`OTHER_MARK` for one not in the table."""
    return VERDICT_MARKS.get(verdict, OTHER_MARK)


def findings_markdown(table: pd.DataFrame) -> str:
    """The findings table as Markdown: a mark per verdict, a link per report."""
    lines = ["| finding | claim | verdict | effect [95% interval], seeds | evidence | report |",
             "|---|---|---|---|---|---|"]
    for r in table.to_dict("records"):
        effect = str(r.get(EFFECT, "-")).replace("\n", "<br>")
        lines.append(f"| {r['finding']} | {r['claim']} | **{mark(r['verdict'])[0]} "
                     f"{r['verdict']}** | {effect} | {r['evidence']} | "
                     f"[{r['report']}]({r['report']}.html) |")
    return "\n".join(lines)
