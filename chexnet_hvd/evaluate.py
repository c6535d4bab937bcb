"""Test-split report of a checkpoint: AUROC / AUPRC with patient-level bootstrap intervals,
operating points from the validation split, test-time augmentation, curves.

    python -m chexnet_hvd.evaluate --checkpoint runs/x/checkpoints/best --data RECORDS --split test \
        --tta tencrop --out runs/x/eval
    horovodrun -np 4 python -m chexnet_hvd.evaluate ...   # each rank scores a disjoint part
    python -m chexnet_hvd.launch -np 4 python -m chexnet_hvd.evaluate --engine tf ...

Writes OUT/report.md, OUT/report.json (every number), OUT/roc.png and OUT/pr.png; OUT defaults
to RUN_DIR/eval/CHECKPOINT_NAME-SPLIT[-TTA][-RECORDS-DIGEST] (`default_out`), outside the checkpoints
training prunes and replaces. Every
rank predicts its part of the split; the predictions are gathered, so every record counts once.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from chexnet_hvd import checkpoints, cli, data, distributed, export, metrics, records, stall, views
from chexnet_hvd.labels import PATHOLOGIES

# Rajpurkar et al. 2017 (CheXNet), Table 2: per-class test AUROC, in the canonical order.
CHEXNET_PAPER_AUROC = dict(zip(PATHOLOGIES, (
    0.8094, 0.9248, 0.8638, 0.7345, 0.8676, 0.7802, 0.7680, 0.8887, 0.7901, 0.8878, 0.9371,
    0.8047, 0.8062, 0.9164), strict=True))
CHEXNET_PAPER_MEAN = 0.841


@dataclasses.dataclass
class EvalConfig:
    checkpoint: str = cli.field(help="checkpoint directory (e.g. RUN_DIR/checkpoints/best), or with "
                                "--backend openvino a directory written by chexnet_hvd.export")
    data: str = cli.field(help="records directory (or raw index) with manifest.json")
    split: str = cli.field("test", help="split to report on")
    val_split: str = cli.field("val", help="split the operating points are chosen on ('' : none)")
    tta: str = cli.field("none", help="test-time augmentation; the report also shows 'none'",
                         choices=["none", "flip", "tencrop"])
    out: str = cli.field("", help="output directory (default: RUN_DIR/eval/NAME-SPLIT for a "
                         "checkpoint RUN_DIR/checkpoints/NAME, else beside the checkpoint: "
                         "CHECKPOINT/../eval/NAME-SPLIT; then -TTA with --tta, and the records "
                         "folder's name for records other than the run's)")
    batch_size: int = cli.field(32, help="images per rank per step (tencrop: x10 views)", minimum=1)
    bootstrap: int = cli.field(1000, help="bootstrap resamples (by patient) for the intervals",
                               minimum=1)
    seed: int = cli.field(0, help="bootstrap seed", minimum=0)
    backend: str = cli.field("tf", help="inference backend", choices=["tf", "openvino"])
    engine: str = distributed.engine_field(
        "what gathers the ranks' predictions: Horovod or TensorFlow's collectives (as chexnet_hvd.train --engine)")
    workers: str = cli.field("", help="--engine tf with no launcher: every worker as host:port "
                             "(as chexnet_hvd.train --workers)")
    worker_index: int = cli.field(0, help="with --workers: this process' place in that list, from 0",
                                  minimum=0)
    stall_timeout: float = cli.field(600.0, help="end the job when no rank completes a batch for "
                                     "this many seconds while scoring, or, at any point, a rank idle "
                                     "for this long hears no heartbeat from another for as long; the "
                                     "line names the rank(s) waited for (exit 76; as "
                                     "chexnet_hvd.train --stall-timeout); 0: off", minimum=0,
                                     maximum=1e6)


def default_out(checkpoint: str | Path, split: str, tta: str = "none", records_name: str = "") -> Path:
    """RUN_DIR/eval/<checkpoint name>-<split>[-<tta>][-<records_name>]: never inside the
    checkpoint, which training's pruning and the swap of `best` delete (RUN_DIR is the
    checkpoint's grandparent when its parent is `checkpoints`, else its parent: an export
    directory's run); test-time augmentation, and other records than the run trained on
    (`other_records`), in the name, so that one evaluation does not overwrite another."""
    ckpt = Path(os.path.abspath(checkpoint))  # not resolved: `best` keeps its name, not its copy's
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    name = [ckpt.name, split, *([tta] if tta != "none" else []), *([records_name] if records_name else [])]
    return run_dir / "eval" / "-".join(name)


def other_records(cfg, meta: dict, manifest: dict) -> str:
    """'' for the records the checkpoint was trained on (their training split's signature is
    the checkpoint's: a staged copy at another path is the same), else a name for the records
    evaluated: their folder's, and the evaluated split's digest (two folders of one name,
    hospital_a/records and hospital_b/records, differ)."""
    if "train" in manifest["splits"] and meta.get("train_signature") == records.split_signature(manifest, "train"):
        return ""
    digest = records.split_signature(manifest, cfg.split)["digest"][:8]
    return f"{Path(os.path.abspath(cfg.data)).name}-{digest}"


def check_classes(meta: dict, manifest: dict, ckpt: str) -> None:
    if differ := checkpoints.classes_differ(meta["classes"], manifest["classes"]):
        raise cli.InputError(ckpt, differ)


def score(predict, recs: data.Records, split: str, view: views.View, batch: int, tta: str, engine,
          watchdog: stall.Watchdog | None = None) -> dict:
    """Gathered predictions (views averaged) with labels, masks, ids and patients; each batch
    scored is progress for the stall `watchdog`, which the first arms (its trace, seconds on a
    loaded node, is no stall, as in training) and each starts the clock of."""
    dataset = data.eval_dataset(recs, split, view, batch, rank=engine.rank,
                                world_size=engine.size, tta=tta)
    batches = itertools.count(1)
    progress = watchdog.progress if watchdog else lambda step=None: None

    def predict_batch(images):
        progress()  # a new pass's first batch (traced anew) counts from here, not from the last
        scores = predict(images)
        progress(next(batches))
        return scores

    local = data.predictions(predict_batch, dataset)
    return metrics.gather(local, engine.allgather_object)


def paper_comparable(manifest: dict) -> bool:
    """CheXNet's AUROCs are NIH ChestX-ray14 test-set numbers: shown beside NIH records of the 14
    classes only, never beside another dataset's classes of the same names (e.g. CheXpert's)."""
    return manifest.get("dataset") == "nih" and manifest["classes"] == list(PATHOLOGIES)


def class_rows(names, pred: dict, ci: dict, tta_auroc, thresholds, sens, spec,
               comparable: bool) -> list[dict]:

    auroc = metrics.per_class_auroc(pred["label"], pred["prob"], pred["mask"])
    auprc = metrics.per_class_auprc(pred["label"], pred["prob"], pred["mask"])
    labelled = (pred["mask"] > 0).sum(0)
    positives = ((pred["label"] >= 0.5) & (pred["mask"] > 0)).sum(0)

    return [{"pathology": name, "labelled": int(labelled[c]), "positives": int(positives[c]), "auroc": num(auroc[c]),
             "auroc_ci": [num(ci["auroc_lo"][c]), num(ci["auroc_hi"][c])],
             "auroc_tta": num(tta_auroc[c]) if tta_auroc is not None else None,
             "auprc": num(auprc[c]), "auprc_ci": [num(ci["auprc_lo"][c]), num(ci["auprc_hi"][c])],
             "threshold": num(thresholds[c]), "sensitivity": num(sens[c]), "specificity": num(spec[c]),
             "chexnet_paper_auroc": CHEXNET_PAPER_AUROC[name] if comparable else None}
            for c, name in enumerate(names)]


def num(v) -> float | None:
    """A number for report.json: rounded, or None where undefined (JSON has no NaN)."""
    return None if v is None or not np.isfinite(v) else round(float(v), 4)


def markdown(report: dict) -> str:
    def f(v, ci=None):
        if v is None:
            return "undefined"
        return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else "")

    tta = report["tta"]
    head = ["pathology", "labelled", "positives", "CheXNet paper", "AUROC [95% CI]"]
    head += [f"AUROC {tta}"] if tta != "none" else []
    head += ["AUPRC [95% CI]", "threshold (val)", "sensitivity", "specificity"]
    rows = []
    for r in report["classes"]:
        row = [r["pathology"], r["labelled"], r["positives"], f(r["chexnet_paper_auroc"]) if r["chexnet_paper_auroc"] else "-",
               f(r["auroc"], r["auroc_ci"])]
        row += [f(r["auroc_tta"])] if tta != "none" else []
        row += [f(r["auprc"], r["auprc_ci"]), f(r["threshold"]), f(r["sensitivity"]), f(r["specificity"])]
        rows.append(row)
    m = report["mean_auroc"]
    mean = ["**mean**", "", "", f"{CHEXNET_PAPER_MEAN:.3f}" if report["paper_comparable"] else "-",
            f(m["value"], [m["ci_lo"], m["ci_hi"]])]
    mean += [f(report["mean_auroc_tta"])] if tta != "none" else []
    rows.append(mean + [""] * (len(head) - len(mean)))
    ci = report["bootstrap"]
    epoch = f"epoch {report['checkpoint_epoch']}, " if report.get("checkpoint_epoch") is not None else ""
    return "\n".join([
        f"# Evaluation: {report['split']} split of {report['data']}", "",
        f"Checkpoint `{report['checkpoint']}` ({epoch}{report['model']}, {report['image_size']} px); "
        f"{report['n']} images of {ci['patients']} patients. 95% intervals: percentile bootstrap "
        f"over patients, {ci['resamples']} resamples, seed {ci['seed']}. Operating points: Youden's "
        f"J on the `{report['val_split'] or '-'}` split. Labelled: the images whose label for the class "
        f"is known (scored); a class without positives or negatives among them is undefined.",
        *(["", f"Note: {report['tta_note']}"] if report.get("tta_note") else []),
        "", cli.markdown_table(head, rows), ""])


def plot_curves(names, pred: dict, out: Path) -> None:
    """roc.png and pr.png: one panel per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = -(-len(names) // cols)
    for kind in ("roc", "pr"):
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.8 * rows), squeeze=False)
        for c, ax in enumerate(axes.flat):
            if c >= len(names):
                ax.axis("off")
                continue
            keep = pred["mask"][:, c] > 0
            truth, p = pred["label"][keep, c] >= 0.5, pred["prob"][keep, c]
            ax.set_title(names[c], fontsize=9)
            if not 0 < truth.sum() < truth.size:
                ax.text(0.5, 0.5, "undefined", ha="center")
                continue
            if kind == "roc":
                fpr, tpr, _ = roc_curve(truth, p)
                ax.plot(fpr, tpr)
                ax.plot([0, 1], [0, 1], ":", color="grey")
            else:
                precision, recall, _ = precision_recall_curve(truth, p)
                ax.plot(recall, precision)
                ax.axhline(truth.mean(), ls=":", color="grey")
        fig.supxlabel("false positive rate" if kind == "roc" else "recall")
        fig.supylabel("true positive rate" if kind == "roc" else "precision")
        fig.tight_layout()
        with cli.output(out / f"{kind}.png", "wb") as fh:
            fig.savefig(fh, format="png", dpi=100)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse_config(EvalConfig, __doc__, argv, prog="python -m chexnet_hvd.evaluate")

    cluster = distributed.workers_flag(cfg.engine, cfg.workers, cfg.worker_index)
    recs = data.open_records(cfg.data)  # bad input fails here, before the engine starts
    engine, placement = distributed.start(cfg.engine, cluster=cluster, stall_timeout=cfg.stall_timeout)
    ranks = engine.allgather_object(dataclasses.asdict(placement))  # where each rank ran
    watchdog = (stall.watch(engine, [r["host"] for r in ranks], cfg.stall_timeout, lambda message, names: None)
                if cfg.stall_timeout > 0 else None)

    try:
        evaluate(cfg, engine, recs, ranks, watchdog)
    except Exception as err:
        if engine.says_peer_left(err):  # a rank failed and said why; this one says no more
            return cli.EXIT_FAILED
        raise
    finally:
        if watchdog:
            watchdog.stop()
    return 0


def evaluate(cfg: EvalConfig, engine, recs: data.Records, ranks: list[dict], watchdog) -> None:
    """Every rank scores its share of the records opened once; the chief reports."""
    manifest = recs.manifest
    predict, meta = export.load_predictor(cfg.checkpoint, cfg.backend)
    check_classes(meta, manifest, cfg.checkpoint)
    names, view = meta["classes"], views.View.of(meta)  # the checkpoint's scaling and crop
    data.check_view(manifest, cfg.data, view)
    recs.units(cfg.split)  # both splits there, before any scoring
    if cfg.val_split and not manifest["splits"].get(cfg.val_split, {}).get("shards"):
        raise cli.InputError(cfg.data, f"no records for split {cfg.val_split!r} (the operating points' "
                             "split: --val-split another, or '' for none)")

    if (note := tta_note(cfg.tta, view)) and engine.rank == 0:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    plain = score(predict, recs, cfg.split, view, cfg.batch_size, "none", engine, watchdog)
    if bad := metrics.not_numbers(plain["prob"]):
        raise cli.InputError(cfg.checkpoint, f"{bad} of its predictions on split {cfg.split!r} are not "
                             "numbers: its weights are a diverged run's")
    tta = score(predict, recs, cfg.split, view, cfg.batch_size, cfg.tta, engine, watchdog) if cfg.tta != "none" else None
    thresholds = np.full(len(names), np.nan)
    if cfg.val_split:
        val = score(predict, recs, cfg.val_split, view, cfg.batch_size, "none", engine, watchdog)
        thresholds = metrics.youden_thresholds(val["label"], val["prob"], val["mask"])
    if watchdog:  # scored: the bootstrap and the report (minutes) are no batch that is late
        watchdog.rest()
    # every rank has the gathered predictions and scores its share of the resamples
    began = time.perf_counter()
    ci = metrics.bootstrap_ci(plain["label"], plain["prob"], plain["mask"], plain["patient"], cfg.bootstrap,
                              cfg.seed, part=(engine.rank, engine.size),
                              gather=engine.allgather_object)  # Horovod/TF: every rank's share
    ci["seconds"] = round(time.perf_counter() - began, 3)
    if engine.rank == 0:  # the chief reports
        report(cfg, engine, meta, manifest, ranks, plain, tta, thresholds, ci)
    engine.barrier()  # Horovod/TF: nobody leaves before the chief has reported


def tta_note(tta: str, view: views.View) -> str | None:
    """What ten-crop shows a model trained without --crop: windows at a scale it never saw."""
    if tta != "tencrop" or view.crop:
        return None
    return ("--tta tencrop: this model was trained without --crop, on whole images; ten-crop's "
            "windows show it the image 256/224 times larger, its borders cut, a scale it never "
            "trained on (train with --crop for CheXNet's geometry)")


def report(cfg: EvalConfig, engine, meta: dict, manifest: dict, ranks: list[dict], plain: dict,
           tta: dict | None, thresholds: np.ndarray, ci: dict) -> None:
    """The chief's report: report.json, report.md and the curves in the output directory; on
    stdout the report, or under a launcher of several ranks (which may prefix every line) its
    headline and where it is."""
    names, size = meta["classes"], meta["image_size"]
    sens, spec = metrics.sensitivity_specificity(plain["label"], plain["prob"], plain["mask"], thresholds)
    tta_auroc = metrics.per_class_auroc(tta["label"], tta["prob"], tta["mask"]) if tta else None
    mean = metrics.mean_defined(metrics.per_class_auroc(plain["label"], plain["prob"], plain["mask"]))
    result = {
        "checkpoint": cfg.checkpoint, "checkpoint_epoch": meta.get("epoch"), "data": cfg.data, "split": cfg.split, "val_split": cfg.val_split,
        "model": meta["model"], "image_size": size, "backend": cfg.backend, "n": int(len(plain["label"])), "tta": cfg.tta,
        "world_size": engine.size, "engine": engine.name, "ranks": ranks, "paper_comparable": paper_comparable(manifest),
        "mean_auroc": {"value": num(mean), "ci_lo": num(ci["mean_auroc_lo"]), "ci_hi": num(ci["mean_auroc_hi"])},
        "mean_auroc_tta": num(metrics.mean_defined(tta_auroc)) if tta else None,
        "tta_note": tta_note(cfg.tta, views.View.of(meta)),
        "classes": class_rows(names, plain, ci, tta_auroc, thresholds, sens, spec,
                              paper_comparable(manifest)),
        "bootstrap": {k: ci[k] for k in ("resamples", "patients", "level", "seed", "seconds")}
                     | {"defined": ci["defined"].tolist()},
    }
    out = Path(cfg.out) if cfg.out else default_out(cfg.checkpoint, cfg.split, cfg.tta,
                                                    other_records(cfg, meta, manifest))
    cli.make_dir(out)
    with cli.output(out / "report.json") as fh:
        fh.write(json.dumps(result, indent=1))
    with cli.output(out / "report.md") as fh:
        fh.write(markdown(result))
    plot_curves(names, plain, out)
    if engine.size == 1:
        print(markdown(result))
    else:
        print(f"{cfg.split}: mean AUROC {result['mean_auroc']['value']} over {result['n']} images "
              f"({engine.size} ranks of the {engine.name} engine)")
    print(f"wrote {out}/report.md, report.json, roc.png, pr.png")


if __name__ == "__main__":
    cli.run(main, leave=(cli.EXIT_FAILED,))
