"""What "why did this match" heatmaps cost and how honest they are (docs/benchmarks.md, docs/quality.md).

    python bench/explain_bench.py cost [--model efficientnet_lite0] [--ks 1 5 10 20] [--repeats 5]
    python bench/explain_bench.py centre --model runs/abe_cpu60/best [--queries 300] [--gallery 3000]

cost: on cub100 JPEGs (or generated images without it), the service's explain work for k results: the query's
forward pass with its feature map (instead of the plain one), then per result the file read + decode +
preprocess, one batched forward pass with feature maps, and the maps rounded to JSON lists. Prints ms per result.

centre: on the cub100 test classes (50-99, tight crops around the birds; this copy has no part or box files), each
query's nearest neighbour by the model, then the share of each heatmap's heat (above its coldest cell) inside
the central box covering half the crop's area, against that box's area share (0.5). Both images of every pair.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.images import read_image_file  # noqa: E402
from models.data import cub_items, select_classes  # noqa: E402
from models.embedder import LocalFeatures  # noqa: E402
from models.evaluate import embed_items, knn  # noqa: E402
from models.explain import local_features, mass_inside, pair_maps  # noqa: E402
from models.zoo import create_embedder  # noqa: E402

CUB = Path("/work/shared/data/cub100")
HALF_AREA_SIDE = 0.5**0.5  # a centred square box with half the crop's area
CENTRE_BOX = ((1 - HALF_AREA_SIDE) / 2, (1 - HALF_AREA_SIDE) / 2, (1 + HALF_AREA_SIDE) / 2, (1 + HALF_AREA_SIDE) / 2)


def test_items(root: Path) -> list[tuple[str, int]]:
    return select_classes(cub_items(root), 50, 100)


def load_model(name: str, image_size: int | None) -> torch.nn.Module:
    embedder = create_embedder(name).eval()
    if image_size:
        from models.embedder import EmbedderConfig, eval_transform

        config = EmbedderConfig.from_dict({**embedder.config.to_dict(), "image_size": image_size,
                                           "resize_size": round(image_size * 256 / 224)})
        embedder.config, embedder._transform = config, eval_transform(config)
    return embedder


def split(features: LocalFeatures, rows: slice) -> LocalFeatures:
    masks = None if features.masks is None else features.masks[rows]
    return LocalFeatures(features.embedding[rows], features.local[rows], masks)


def cost(args: argparse.Namespace) -> None:
    embedder = load_model(args.model, args.image_size)
    paths = [p for p, _ in test_items(CUB)] if CUB.is_dir() else []
    if not paths:
        print("cub100 not found: generating images instead")
        from PIL import Image

        tmp = REPO / "runs" / "explain_bench_images"
        tmp.mkdir(parents=True, exist_ok=True)
        for i in range(40):
            path = tmp / f"{i}.jpg"
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (227, 227, 3), dtype=np.uint8)).save(path)
            paths.append(str(path))
    rng = random.Random(0)
    query = embedder.preprocess(read_image_file(paths[0]))[None]

    def timed(fn) -> float:
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return float(np.median(times)) * 1000

    with torch.inference_mode():
        timed(lambda: embedder(query))  # warm-up
        plain = timed(lambda: embedder(query))
        with_map = timed(lambda: local_features(embedder, query))
    print(f"model {args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"input {embedder.config.image_size} px, median of {args.repeats}")
    print(f"\nquery forward pass: plain {plain:.1f} ms, keeping its feature map {with_map:.1f} ms\n")
    print("| k results | decode + preprocess | forward with maps (plain forward) | heatmaps + JSON | total "
          "| per result |")
    print("|---|---|---|---|---|---|")
    query_features = local_features(embedder, query)
    for k in args.ks:
        chosen = rng.sample(paths[1:], k)
        decode = timed(lambda chosen=chosen: [embedder.preprocess(read_image_file(p)) for p in chosen])
        pixels = torch.stack([embedder.preprocess(read_image_file(p)) for p in chosen])
        forward = timed(lambda pixels=pixels: local_features(embedder, pixels))
        with torch.inference_mode():  # the same batch embedded plainly: what the maps add to a forward pass
            plain_batch = timed(lambda pixels=pixels: embedder(pixels))
        features = local_features(embedder, pixels)

        def maps_json(features: LocalFeatures = features) -> None:
            maps = pair_maps(query_features, features)
            json.dumps([torch.round(maps.query, decimals=3).tolist(), torch.round(maps.result, decimals=3).tolist(),
                        None if features.masks is None else torch.round(features.masks, decimals=3).tolist()])

        maps_ms = timed(maps_json)
        total = decode + forward + maps_ms
        print(f"| {k} | {decode:.1f} ms | {forward:.1f} ms ({plain_batch:.1f} ms) | {maps_ms:.1f} ms | {total:.1f} ms "
              f"| {total / k:.1f} ms |")


def centre(args: argparse.Namespace) -> None:
    if not CUB.is_dir():
        print(f"{CUB} not found: nothing to measure")
        return
    embedder = load_model(args.model, args.image_size)
    every = test_items(CUB)
    items = random.Random(1).sample(every, min(args.gallery, len(every)))  # CPU time: a random subset as gallery
    started = time.perf_counter()
    emb, labels = embed_items(embedder, items, read_image_file, batch_size=32, num_workers=args.workers)
    neighbours = knn(emb, emb, 1, exclude_self=True)[:, 0]
    queries = random.Random(0).sample(range(len(items)), min(args.queries, len(items)))
    shares, same_class, controls = [], [], []
    for start in range(0, len(queries), 16):
        chunk = queries[start : start + 16]
        paths = [items[i][0] for i in chunk] + [items[int(neighbours[i])][0] for i in chunk]
        pixels = torch.stack([embedder.preprocess(read_image_file(p)) for p in paths])
        features = local_features(embedder, pixels)
        n = len(chunk)
        for row in range(n):
            maps = pair_maps(split(features, slice(row, row + 1)), split(features, slice(n + row, n + row + 1)))
            shares.append((mass_inside(maps.query[0], CENTRE_BOX), mass_inside(maps.result[0], CENTRE_BOX)))
            same_class.append(labels[chunk[row]] == labels[int(neighbours[chunk[row]])])
            # Control: the same query against another query's match (a pair that did not match), so what the
            # geometry alone gives (tight crops, and the coldest cell set to zero) is visible.
            other = n + (row + 1) % n
            control = pair_maps(split(features, slice(row, row + 1)), split(features, slice(other, other + 1)))
            controls.append((mass_inside(control.query[0], CENTRE_BOX), mass_inside(control.result[0], CENTRE_BOX)))
    values = np.array(shares).ravel()
    same = np.repeat(np.array(same_class), 2)
    print(f"model {args.model}, {len(queries)} queries among {len(items)} random cub100 test images, input "
          f"{embedder.config.image_size} px, {time.perf_counter() - started:.0f} s")
    print(f"top-1 neighbour of the same species: {np.mean(same_class):.1%}")
    print("| pairs | maps | heat inside the central half-area box (mean) | maps with more than 0.5 there |")
    print("|---|---|---|---|")
    rows = [("all top-1 pairs", values[np.ones_like(same)]), ("same species", values[same]),
            ("other species", values[~same]), ("control: unmatched pairs", np.array(controls).ravel())]
    for name, chosen in rows:
        if len(chosen):
            print(f"| {name} | {len(chosen)} | {chosen.mean():.3f} | {np.mean(chosen > 0.5):.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("cost", "centre"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="efficientnet_lite0", help="a preset name or a checkpoint dir")
        p.add_argument("--image-size", type=int, help="override the model's input size (e.g. what it trained at)")
        p.add_argument("--threads", type=int, default=0)
    sub.choices["cost"].add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 20])
    sub.choices["cost"].add_argument("--repeats", type=int, default=5)
    sub.choices["centre"].add_argument("--queries", type=int, default=300)
    sub.choices["centre"].add_argument("--gallery", type=int, default=3000, help="test images searched (all: 2953)")
    sub.choices["centre"].add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    (cost if args.what == "cost" else centre)(args)


if __name__ == "__main__":
    main()
