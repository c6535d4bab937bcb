"""ImageNet initialisation as clusters need it: fetch once where there is internet (a login
node), then train from the cache on compute nodes, which never download.

    python -m chexnet_hvd.weights fetch --model densenet121     # and/or resnet50
    python -m chexnet_hvd.weights path --model densenet121      # where the cached file is
    python -m chexnet_hvd.train --weights imagenet ...           # reads the cache only

The files are Keras' published no-top ImageNet weights, checked against the md5 hashes that
keras.applications checks them with; a download resumes after an interruption (as
chexnet_hvd.download does) and only a verified file gets its final name. The cache is
$CHEXNET_WEIGHTS_DIR, else $XDG_CACHE_HOME/chexnet_hvd/weights (~/.cache/...): put it on a
filesystem the compute nodes see.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from tqdm import tqdm

from chexnet_hvd import cli, download

KERAS = "https://storage.googleapis.com/tensorflow/keras-applications"
# model: (file, URL, md5) as keras.applications (Keras 2.15) downloads and checks them
PUBLISHED = {
    "densenet121": ("densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    f"{KERAS}/densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    "30ee3e1110167f948a6b9946edeeb738"),
    "resnet50": ("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 f"{KERAS}/resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 "4d473c1dd8becc155b73f8504c6f6626"),
}

INITIALISED_FROM = {"resnet59": "resnet50"}  # its first four stages (models.resnet59)


def cache_dir() -> Path:
    """$CHEXNET_WEIGHTS_DIR, else $XDG_CACHE_HOME (or ~/.cache) / chexnet_hvd / weights."""
    if os.environ.get("CHEXNET_WEIGHTS_DIR"):
        return Path(os.environ["CHEXNET_WEIGHTS_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chexnet_hvd" / "weights"


def resolve(weights: str, model: str) -> str | None:
    """--weights as a file to load: None for 'none', the cached file for 'imagenet' (never
    downloaded here: a missing one is a one-line error naming the fetch command), else the
    path given."""
    if weights in ("", "none"):
        return None
    if weights != "imagenet":
        return weights
    source = INITIALISED_FROM.get(model, model)
    if source not in PUBLISHED:
        raise cli.InputError("--weights", f"no published ImageNet weights for {model} "
                             f"(there are for {', '.join([*PUBLISHED, *INITIALISED_FROM])})")
    path = cache_dir() / PUBLISHED[source][0]
    if not path.is_file():
        raise cli.InputError(path, "not in the weights cache: run `python -m chexnet_hvd.weights "
                             f"fetch --model {source}` where there is internet (CHEXNET_WEIGHTS_DIR "
                             "sets the cache)")
    return str(path)


@dataclasses.dataclass
class WeightsConfig:
    action: str = cli.field(help="fetch: download into the cache; path: print the cached file",
                            choices=["fetch", "path"])
    model: str = cli.field("densenet121", help="whose ImageNet weights", choices=sorted(PUBLISHED))
    url: str = cli.field("", help="a mirror's URL of the file (default: Keras' own)")
    md5: str = cli.field("", help="the mirror file's md5 (default: the published one)")
    retries: int = cli.field(3, help="retries after a transient failure, each resuming", minimum=0)
    timeout: float = cli.field(60.0, help="socket timeout in seconds", exclusive_minimum=0)
    progress: bool = cli.field(True, help="show a progress bar")


def fetch(cfg: WeightsConfig) -> tuple[Path, str]:
    """Download the model's file into the cache (resumable, md5-checked); (path, what happened)."""
    name, url, md5 = PUBLISHED[cfg.model]
    out = cli.make_dir(cache_dir())
    if (out / name).is_file():  # a cache hit is checked too: a changed file is not used silently
        try:
            download.verify(out / name, str(out / name), (cfg.md5 or md5).lower())
        except cli.InputError as err:
            raise cli.InputError(err.where, f"{err.what} in the cache: delete it and fetch again") from None
    transfer = download.DownloadConfig(out=str(out), retries=cfg.retries, timeout=cfg.timeout)
    with tqdm(unit="B", unit_scale=True, desc=name, disable=not cfg.progress or None) as bar:
        what = download.fetch(name, cfg.url or url, out, (cfg.md5 or md5).lower(), transfer, bar)
    return out / name, what


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse_config(WeightsConfig, __doc__, argv, positional=["action"],
                           prog="python -m chexnet_hvd.weights")
    if cfg.action == "path":
        print(resolve("imagenet", cfg.model))
        return 0
    path, what = fetch(cfg)
    print(f"{path}: {what}")
    return 0


if __name__ == "__main__":
    cli.run(main)
