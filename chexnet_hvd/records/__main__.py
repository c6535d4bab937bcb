"""`python -m chexnet_hvd.records`: the records writer's CLI (chexnet_hvd.records.writer)."""

from chexnet_hvd import cli
from chexnet_hvd.records import writer

if __name__ == "__main__":  # not in the writer's spawned worker processes
    cli.run(writer.main)
