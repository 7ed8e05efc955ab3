"""The train and eval commands of `retrieval` (registered on the one parser by app/cli.py's build_parser), and
the --set KEY=VALUE option they share with `jobs submit`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from app.settings import get_settings


def _override(text: str) -> tuple[str, object]:
    """`--set KEY=VALUE`, parsed once here into (dotted key, YAML value) for models.config.load_config."""
    from models.config import parse_override

    try:
        return parse_override(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_train(args: argparse.Namespace) -> int:
    """Train from a YAML config (its data: section), then score the best checkpoint on the test classes.
    Under torchrun: `torchrun --nproc_per_node N -m app.cli train ...`."""

    import torch.distributed as dist

    from app.images import file_loader
    from models.config import load_config
    from models.train import run_config

    config = load_config(args.config, args.overrides)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    summary = run_config(config, out, file_loader(get_settings()), args.device, args.init_checkpoint)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:

    from app.images import file_loader
    from models.config import load_config
    from models.data import dataset_splits, load_eval_items
    from models.embedder import resolve_device
    from models.evaluate import DEFAULT_KS, evaluate_with_flip_average
    from models.zoo import create_embedder

    if (args.config is None) == (args.root is None):
        args.parser.error("give exactly one of --root (a dataset) or --config (a training config's split)")
    if args.config and args.gallery_csv:
        args.parser.error("--gallery-csv goes with --root, not --config")
    if args.overrides and not args.config:
        args.parser.error("--set goes with --config")
    if args.config:  # the split exactly as training split it
        train, val, test = dataset_splits(load_config(args.config, args.overrides).data)
        items = {"train": train, "val": val, "test": test}[args.split]
    else:
        items = load_eval_items(args.dataset, args.root, args.classes, args.csv)
    if not items:
        args.parser.error("no images selected")
    gallery = load_eval_items("csv", args.root, args.classes, args.gallery_csv) if args.gallery_csv else None
    device = resolve_device(args.device)
    embedder = create_embedder(args.model).to(device)
    metrics = evaluate_with_flip_average(embedder, items, file_loader(get_settings()), args.ks or DEFAULT_KS, gallery,
                                         args.batch_size, args.workers, device, flip_average=args.flip_average)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


def _add_set_option(parser: argparse.ArgumentParser, when: str = "",
                    what: str = "override a config value") -> None:
    parser.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="KEY=VALUE",
                        help=f"{when}{what} (parsed as YAML), e.g. --set steps=100 --set data.root=/data/cub100")


def add_train_eval_cli(sub: argparse._SubParsersAction) -> None:
    """`train` and `eval` (models/ exposes the functions; the options live here)."""
    train = sub.add_parser("train", help="train an embedder from a YAML config (see configs/)",
                           description="Train an embedder from a YAML config.")
    train.add_argument("--config", required=True, help="YAML training config (see configs/)")
    train.add_argument("--out", help="output dir (default: runs/<config name>); resumes when it holds a resume state")
    train.add_argument("--device", default="auto")
    train.add_argument("--init-checkpoint", help="fine-tune this checkpoint instead of config.embedder")
    _add_set_option(train)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="Recall@K, MAP@R, R-precision of a preset or checkpoint on a dataset",
                              description="Recall@K, MAP@R, R-precision of an embedder.")
    evaluate.add_argument("--model", required=True, help="a preset name (models.zoo.PRESETS) or a checkpoint dir")
    evaluate.add_argument("--dataset", choices=("cub", "folder", "csv"), default="cub")
    evaluate.add_argument("--root", help="dataset root (or the query CSV's image root)")
    evaluate.add_argument("--csv", help="CSV manifest (path,label) for --dataset csv; the queries for In-Shop")
    evaluate.add_argument("--gallery-csv", help="query/gallery protocol: the gallery CSV (In-Shop)")
    evaluate.add_argument("--classes", help="keep labels in [A, B), e.g. 50:100 for cub100's test half")
    evaluate.add_argument("--config", help="take the images from this training config's data section instead of "
                                           "--root/--classes")
    evaluate.add_argument("--split", choices=("train", "val", "test"), default="test",
                          help="with --config: which of its splits")
    _add_set_option(evaluate, "with --config: ")
    evaluate.add_argument("--ks", type=int, nargs="+", help="the K of Recall@K (default: 1 2 4 8)")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--workers", type=int, default=2)
    evaluate.add_argument("--output", help="also write the metrics JSON here")
    evaluate.add_argument("--flip-average", action="store_true",
                          help="average each image's embedding with its mirror image's (2x cost); "
                               "the plain metrics come along")
    evaluate.set_defaults(func=cmd_eval, parser=evaluate)
