"""A records directory's manifest.json, built from what the writer wrote: per split its
records, rejected and missing images, patients, positives and negatives per class and shards;
the sources, labels and split that made it; CheXNet's class weights. Its schema and checks on
reading: `chexnet_hvd.records`."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from chexnet_hvd import metadata, sources, splits
from chexnet_hvd.records import MANIFEST, RAW_ENCODING, SCHEMA_VERSION

if TYPE_CHECKING:
    from chexnet_hvd.records.writer import RecordsConfig


def build_manifest(listing: sources.Listing, results: list[dict], present: np.ndarray,
                   cfg: RecordsConfig) -> dict:
    """Counts per split, positives per class, shards, class weights; reconciles with the table
    (`present`: which of its rows' files exist)."""
    table = listing.table
    names = metadata.class_names(table)
    unreadable = table["image"].isin({r[0] for res in results for r in res["rejects"]}).to_numpy()
    written_rows = present & ~unreadable
    per_split: dict[str, Any] = {}
    for split in splits.SPLITS:
        mine = [r for r in results if r["split"] == split]
        listed = int((table["split"] == split).sum())
        if not listed:
            continue
        written = sum(r["count"] for r in mine)
        rejected = sum(len(r["rejects"]) for r in mine)
        missing = int(((table["split"] == split).to_numpy() & ~present).sum())
        if written + rejected + missing != listed:  # cannot happen unless the writer is broken
            raise RuntimeError(f"{split}: written {written} + rejected {rejected} + missing "
                               f"{missing} != listed {listed}")
        positives = np.sum([r["positives"] for r in mine] or [[0] * len(names)], axis=0)
        negatives = np.sum([r["negatives"] for r in mine] or [[0] * len(names)], axis=0)
        per_split[split] = {
            "count": written, "rejected": rejected, "missing": missing, "listed": listed,
            # the patients of the written records (not of the missing or unreadable images)
            "patients": int(table.loc[(table["split"] == split).to_numpy() & written_rows, "patient"].nunique()),
            "positives": dict(zip(names, positives.tolist(), strict=True)),
            "negatives": dict(zip(names, negatives.tolist(), strict=True)),
            # AUROC is undefined for these classes on this split (and they teach nothing in train)
            "no_positives": [n for n, p in zip(names, positives, strict=True) if p == 0],
            "no_negatives": [n for n, q in zip(names, negatives, strict=True) if q == 0],
            # key: what the shard was written from, rows in order (ShardJob.key): a resume checks it
            "shards": [{"file": r["file"], "count": r["count"], "bytes": r["bytes"], "key": r["key"]} for r in mine],
        }
    none = dict.fromkeys(names, 0)
    train = per_split.get("train", {"positives": none, "negatives": none})
    pos = np.array([train["positives"][n] for n in names], dtype=np.float64)
    neg = np.array([train["negatives"][n] for n in names], dtype=np.float64)
    named = sources.sources(cfg)
    bits: dict[str, int] = {}
    for r in results:
        for depth, n in r["source_bits"].items():
            bits[depth] = bits.get(depth, 0) + n
    return {
        "schema_version": SCHEMA_VERSION,
        "dataset": "+".join(d for _, d, _, _ in named),
        # Each source's CSV (and its hash: relabelled rows show) and its share of the table.
        "sources": [{"name": name, "dataset": dataset, "csv": str(csv),
                     "csv_sha256": metadata.file_sha256(csv), "images": str(folder),
                     "listed": int((table["source"] == name).sum()),
                     "dropped_by_views": listing.dropped_by_views[name]}
                    for name, dataset, csv, folder in named],
        "labels": {"observations": cfg.observations, "uncertainty": cfg.uncertainty,
                   "views": cfg.views, "label_map": list(cfg.label_map)},
        # Rows of the CSVs --views left out: not listed, not counted anywhere else.
        "dropped_by_views": sum(listing.dropped_by_views.values()),
        "classes": list(names),
        "num_classes": len(names),
        "image_size": cfg.image_size,  # null: stored at the source resolution
        "channels": 1,
        "encoding": RAW_ENCODING if cfg.format == "raw" else cfg.encoding,
        "split_method": cfg.split,
        "split_fractions": list(cfg.fractions),
        "seed": cfg.seed,
        "shard_size": cfg.shard_size,
        "splits": per_split,
        # Images per bit depth of the source grey levels; 16-bit sources are scaled to 8 bits
        # by their real range (images.to_8bit), so 12-bit data is not left nearly black.
        "source_bit_depths": bits,
        # CheXNet's weighted BCE: a positive of class c weighs neg_c / pos_c (Rajpurkar et al.
        # 2017), both counted over the labelled (unmasked) entries only.
        "pos_weight": dict(zip(names, np.where(pos > 0, neg / np.maximum(pos, 1), 1.0).round(6).tolist(),
                               strict=True)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def manifest_warnings(manifest: dict) -> list[str]:
    """What the records command warns of, a line each."""
    return [*empty_split_warnings(manifest), *one_sided_warnings(manifest), *depth_warnings(manifest)]


def empty_split_warnings(manifest: dict) -> list[str]:
    """A line per split that was asked for (a fraction above 0 of a random split; any split of
    an official one, val as --fractions says) and holds no record."""
    fractions = dict(zip(splits.SPLITS, manifest["split_fractions"], strict=True))
    official = manifest["split_method"] == "official"
    lines = []
    for split in splits.SPLITS:
        info = manifest["splits"].get(split)
        asked = fractions[split] > 0 or (official and split != "val")
        if asked and not (info and info["count"]):
            why = (f"all {info['listed']} of its images missing or unreadable" if info else
                   "the sources' own split (their lists or split column, or the val fraction "
                   "carved from the training patients) gives it no image" if official else
                   f"no patient drawn for it: too few patients for --fractions {fractions[split]:g}")
            lines.append(f"warning: {split} split: no record written ({why})")
    return lines


def one_sided_warnings(manifest: dict) -> list[str]:
    """A line per scored split (val, test) with records, and classes whose AUROC it cannot
    define: no positives, or no negatives, among its written records."""
    lines = []
    for split in ("val", "test"):
        info = manifest["splits"].get(split)
        if info and info["count"] and (info["no_positives"] or info["no_negatives"]):
            parts = [f"no {kind} for {', '.join(info[f'no_{kind}'])}"
                     for kind in ("positives", "negatives") if info[f"no_{kind}"]]
            lines.append(f"warning: {split} split: {'; '.join(parts)}: AUROC undefined for these "
                         f"classes (more patients in the split, or another --seed or --fractions)")
    return lines


def depth_warnings(manifest: dict) -> list[str]:
    """A line when the sources' grey levels came at several depths above 8 bits: each image is
    scaled by its own (a DICOM's BitsStored; a 16-bit PNG's, the smallest that holds its
    brightest pixel: images.to_8bit), so a dark PNG of a 12-bit set (none above 1,023) comes
    out 4x brighter than its neighbours."""
    deep = {int(d): n for d, n in manifest["source_bit_depths"].items() if int(d) > 8}
    if len(deep) < 2:
        return []
    counts = ", ".join(f"{n} at {d} bits" for d, n in sorted(deep.items()))
    return [f"warning: source images of several grey-level depths ({counts}): each was scaled to "
            f"8 bits by its own (a DICOM's BitsStored; a PNG's, the smallest that holds its "
            f"brightest pixel), so a dark PNG of a deeper set comes out brighter than its "
            f"neighbours (per depth: source_bit_depths in {MANIFEST})"]
