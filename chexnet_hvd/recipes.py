"""Named, versioned training recipes: a paper's or a reference suite's settings in this
trainer's flags, so a run is reproduced by name rather than rebuilt from prose.

    python -m chexnet_hvd.train --recipe list
    python -m chexnet_hvd.train --recipe show chexnet
    python -m chexnet_hvd.train --recipe chexnet --data RECORDS --run-dir runs/x [--epochs 5 ...]

A recipe sets trainer flags; flags given on the command line override it. The run log's start
record names the recipe and its version beside the effective config. A recipe's version goes
up whenever any of its settings changes. `records` and `evaluate` say how the records were
written and how the run is evaluated to match the source; the trainer does not apply them.
"""

from __future__ import annotations

import dataclasses
import textwrap

import tomli_w

from chexnet_hvd import cli


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    version: int
    summary: str
    source: str
    train: dict  # TrainConfig fields
    records: dict = dataclasses.field(default_factory=dict)  # python -m chexnet_hvd.records flags
    evaluate: dict = dataclasses.field(default_factory=dict)  # python -m chexnet_hvd.evaluate flags


# How the recipes meant for GPUs run, not what they learn (bitwise the same at any N): 8 training
# steps per call of Keras' train function, so that Python's cost per call (~1 ms) is paid once
# per 8 steps of a few milliseconds (docs/benchmarks.md); the Slurm templates' default too.
GPU = {"steps_per_execution": 8}

RECIPES = {r.name: r for r in [
    Recipe("chexnet", 3, "CheXNet: DenseNet-121 from ImageNet, 224 px, Adam 1e-3 at batch 16, "
           "weighted BCE, lr x0.1 on a plateau (patience 1), horizontal flips; random 224 crops "
           "of 256-px records, the centre crop in validation and test",
           "Rajpurkar et al. 2017, CheXNet, arXiv:1711.05225: the model, initialisation, "
           "ImageNet mean/std, input size, optimizer, batch, weighted loss, flips and the x0.1 "
           "decay on a validation plateau. The paper decays on the validation loss and keeps the "
           "lowest-loss model; this trainer watches the validation mean AUROC for both. The paper "
           "downscales each image to 224 and uses no crops and no test-time augmentation. Added "
           "here, as its reimplementations and their OpenVINO port do: 256-px records, random "
           "224 windows of them in training (--crop, with the flips), the centre window in "
           "validation and test, and ten-crop evaluation at that same scale; and the epochs "
           "(20 here, early stopping after 3).",
           {"model": "densenet121", "image_size": 224, "weights": "imagenet", "optimizer": "adam",
            "lr": 1e-3, "reference_batch": 16, "batch_size": 16, "class_weights": "manifest",
            "schedule": "plateau", "plateau_patience": 1, "plateau_factor": 0.1, "augment": True,
            "crop": True, "epochs": 20, "early_stopping": 3, **GPU},
           records={"image_size": 256, "encoding": "uint8"}, evaluate={"tta": "tencrop"}),
    Recipe("chexpert", 2, "CheXpert: DenseNet-121 from ImageNet, 320 px, the 5 competition "
           "classes with an uncertainty policy per class, Adam 1e-4 at batch 16, 3 epochs",
           "Irvin et al. 2019, CheXpert, AAAI (arXiv:1901.07031): the model, initialisation, "
           "320-px input, Adam 1e-4 fixed, batch 16, 3 epochs, checkpoints every 4,800 "
           "iterations, and the per-class finding that U-Ones suits Atelectasis and Edema. Where "
           "the paper's best policy is one this suite does not implement (U-MultiClass for "
           "Cardiomegaly and Pleural Effusion, U-SelfTrained for Consolidation) the recipe uses "
           "U-Ignore: our substitute, not the paper's. Not from the paper: horizontal flips (the "
           "trainer's default). Not reproduced: its study-level prediction (maximum over a "
           "study's views).",
           {"model": "densenet121", "image_size": 320, "weights": "imagenet", "optimizer": "adam",
            "lr": 1e-4, "reference_batch": 16, "batch_size": 16, "schedule": "constant",
            "class_weights": "none", "epochs": 3, "checkpoint_every_steps": 4800, **GPU},
           records={"dataset": ["chexpert"], "observations": "competition",
                    "uncertainty": "ignore,Atelectasis=ones,Edema=ones", "image_size": 320,
                    "encoding": "uint8"}),
    Recipe("resnet59_large", 2, "ResNet-59 on 896 px inputs, SGD (Nesterov 0.9), lr scaled "
           "with the global batch after a warmup proportional to it",
           "SURFsara / Intel large-input chest X-ray work (ResNet-59 for 896-1024 px, warmup "
           "proportional to the global batch); lr 0.1 per 256 images after Goyal et al. 2017, "
           "arXiv:1706.02677. Chosen here, not from the source: cosine decay, 30 epochs, "
           "batch 4 per GPU (what fits at 896 px), weighted BCE.",
           {"model": "resnet59", "image_size": 896, "weights": "none", "optimizer": "sgd",
            "lr": 0.1, "reference_batch": 256, "batch_size": 4, "warmup_epochs": -1.0,
            "schedule": "cosine", "class_weights": "manifest", "precision": "mixed_float16",
            "epochs": 30, **GPU},
           records={"image_size": 1024, "encoding": "png"}),
    Recipe("dell_baseline", 2, "The Dell EMC suite's settings: DenseNet-121 at 256 px, Adam 1e-3 "
           "not scaled with the world size, no warmup, batch 64 per GPU, flips, 10 epochs",
           "Dell EMC HPC and AI Innovation Lab, 'AI radiologist' ChestX-ray14 suite (TF 1.12 + "
           "Horovod 0.16): for throughput and AUROC comparable with its table. ImageNet "
           "initialisation and unweighted BCE are assumed here, not taken from its code.",
           {"model": "densenet121", "image_size": 256, "weights": "imagenet", "optimizer": "adam",
            "lr": 1e-3, "reference_batch": 0, "batch_size": 64, "warmup_epochs": 0.0,
            "schedule": "constant", "class_weights": "none", "augment": True, "epochs": 10, **GPU},
           records={"image_size": 256, "encoding": "uint8"}),
    Recipe("nas_candidate", 1, "What every architecture-search candidate trains with "
           "(python -m chexnet_hvd.nas sets the model, size, batch and epochs)",
           "GenNAS-style search space (chexnet_hvd.nas.space); short, equal training for every "
           "candidate so that their validation AUROCs compare.",
           {"optimizer": "adam", "lr": 1e-3, "reference_batch": 16, "schedule": "constant",
            "class_weights": "none", "resume": True, "keep_checkpoints": 1, "verbose": 2}),
]}


def names() -> list[str]:
    """The recipes' names, sorted."""
    return sorted(RECIPES)


def get(name: str) -> Recipe:
    """The recipe called `name`; an unknown name is a one-line error listing the known ones."""
    if name not in RECIPES:
        raise cli.InputError("--recipe", f"unknown recipe {name!r} (known: {', '.join(names())}; "
                             "--recipe list)")
    return RECIPES[name]


def listing() -> str:
    """One line per recipe: name, version, summary."""
    return "\n".join(f"{r.name} (v{r.version}): {r.summary}" for r in RECIPES.values())


def flags(settings: dict) -> list[str]:
    """Settings as command-line flags: {"image_size": 256, "augment": False, "dataset": ["nih"]}
    -> ["--image-size", "256", "--no-augment", "--dataset", "nih"]."""
    out: list[str] = []
    for key, value in settings.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            out.append(f"--{flag}" if value else f"--no-{flag}")
        elif isinstance(value, list):
            out += [f"--{flag}", *map(str, value)]
        else:
            out += [f"--{flag}", str(value)]
    return out


def show(name: str) -> str:
    """A recipe as a settings file for `python -m chexnet_hvd.train --config FILE` (TOML): what
    it is and its source as comments, its trainer settings, and the records and evaluate flags
    it stands for as comments too."""
    r = get(name)
    lines = [line for text in (f"{r.name} (version {r.version}): {r.summary}", f"source: {r.source}")
             for line in textwrap.wrap(text, 96, initial_indent="# ", subsequent_indent="# ")]
    for command, settings in (("records", r.records), ("evaluate", r.evaluate)):
        if settings:
            lines.append(f"# with: python -m chexnet_hvd.{command} " + " ".join(flags(settings)))
    return "\n".join(lines) + "\n" + tomli_w.dumps({"recipe": r.name, **r.train})


def asked(argv: list[str]) -> list[str]:
    """The words after --recipe in argv (two for `show NAME`), or [] without one."""
    for i, arg in enumerate(argv):
        if arg == "--recipe" or arg.startswith("--recipe="):
            words = [arg.split("=", 1)[1]] if "=" in arg else []
            words += argv[i + 1:i + 3 - len(words)]
            return words[:2] if words[:1] == ["show"] else words[:1]
    return []
