"""``python -m msl_ds train|make-world|compare|make-base|import-model ...``: the commands without their scripts.

``deepspeed --num_gpus N --module msl_ds train CONFIG`` is how :mod:`msl_ds.compare` launches its
runs, so an installed package needs no checkout.
"""

import sys


def main() -> None:
    commands = ("train", "make-world", "compare", "make-base", "import-model")
    # the DeepSpeed launcher puts --local_rank=N before the arguments it was given
    at = next((i for i, a in enumerate(sys.argv[1:], 1) if not a.startswith("--local_rank")), None)
    if at is None or sys.argv[at] not in commands:
        raise SystemExit(f"usage: python -m msl_ds {{{'|'.join(commands)}}} [arguments]")
    cmd = sys.argv.pop(at)
    if cmd == "train":
        from msl_ds.cli import train as run
    elif cmd == "make-world":
        from msl_ds.cli import make_world as run
    elif cmd == "compare":
        from msl_ds.compare import main as run
    elif cmd == "make-base":
        from msl_ds.base import main as run
    else:
        from msl_ds.models.importer import main as run
    sys.exit(run())


if __name__ == "__main__":
    main()
