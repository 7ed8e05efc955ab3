"""Training and evaluation end to end on tiny synthetic images: overfitting, resume, DDP (gloo), metrics by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.cli import main as retrieval_cli
from app.images import read_image_file
from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import TrainConfig, load_config, parse_override
from models.data import csv_items, folder_items, m_per_class_batches, split_items
from models.evaluate import evaluate_embeddings, evaluate_items, knn
from models.optim import freeze_parameters
from models.train import train
from models.zoo import create_embedder

REPO = Path(__file__).resolve().parents[1]


def make_images(root: Path, classes: int = 4, per_class: int = 8, size: int = 40) -> list[tuple[str, int]]:
    """Class c: stripes at one of `classes` orientations/frequencies, random colours and noise on top."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    items = []
    for label in range(classes):
        angle = np.pi * label / classes
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            phase = rng.uniform(0, 2 * np.pi)
            wave = np.sin(2 * np.pi * 4 * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
            colour = rng.uniform(0.2, 1.0, size=3)
            img = 0.5 + 0.4 * wave[..., None] * colour + rng.normal(0, 0.08, (size, size, 3))
            path = folder / f"{i}.png"
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
            items.append((str(path), label))
    return items


def tiny_config(**overrides) -> TrainConfig:
    base = dict(
        embedder={
            "arch": "irt",
            "backbone": "resnet10t",
            "dim": 32,
            "image_size": 32,
            "resize_size": 36,
            "pooling": "mean",
            "extra": {"projection": "linear"},
        },
        loss={"name": "contrastive_xbm", "memory_size": 64, "koleo": 0.1},
        steps=20,
        batch_size=16,
        m_per_class=4,
        lr=1e-3,
        head_lr=1e-3,
        warmup_steps=5,
        num_workers=0,
        eval_every=10,
        checkpoint_every=10,
        log_every=1,
        amp=False,
        freeze_bn=True,
        ks=[1, 2],
    )
    base.update(overrides)
    return TrainConfig.from_dict(base)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[tuple[str, int]]:
    return make_images(tmp_path_factory.mktemp("synth"))


def test_overfits_a_tiny_set_to_recall_one(images, tmp_path) -> None:
    result = train(tiny_config(), images, images, tmp_path / "run", read_image_file, device="cpu")
    best = load_checkpoint(result.best_checkpoint_dir)
    metrics = evaluate_items(best, images, read_image_file, ks=[1], num_workers=0)
    assert metrics["recall@1"] == 1.0
    assert result.metrics["recall@1"] == 1.0
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "val" and lines[0]["step"] == 0 and lines[0]["recall@1"] < 1.0  # learned, not given
    assert [e["step"] for e in lines if e["event"] == "train"] == list(range(1, 21))
    assert (tmp_path / "run" / "last").is_dir()


def test_stop_and_resume_continue_from_the_same_step(images, tmp_path) -> None:
    out = tmp_path / "run"
    config = tiny_config(steps=12, eval_every=6, checkpoint_every=4)
    seen: list[int] = []

    def progress(entry: dict) -> None:
        if entry["event"] == "train":
            seen.append(entry["step"])

    first = train(
        config, images, images[:8], out, read_image_file, device="cpu", progress=progress,
        should_stop=lambda: len(seen) >= 5,
    )
    assert first.stopped and first.step == 5
    assert torch.load(out / "resume.pt", weights_only=False)["step"] == 5
    second = train(config, images, images[:8], out, read_image_file, device="cpu", progress=progress)
    assert not second.stopped and second.step == 12
    assert seen == list(range(1, 13))  # steps 6..12 after the resume, none repeated
    # A third call finds the run finished and returns without training.
    third = train(config, images, images[:8], out, read_image_file, device="cpu", progress=progress)
    assert third.step == 12 and seen == list(range(1, 13))


def test_pca_head_is_fitted_before_training(images, tmp_path) -> None:
    embedder = {
        "arch": "irt",
        "backbone": "resnet10t",
        "dim": 8,
        "image_size": 32,
        "resize_size": 36,
        "extra": {"projection": "pca"},
    }
    result = train(
        tiny_config(embedder=embedder, steps=2, eval_every=2), images, images, tmp_path / "pca", read_image_file,
        device="cpu",
    )
    model = load_checkpoint(result.best_checkpoint_dir)
    components = model.projection.components
    # Fitted: orthonormal principal axes, not the identity placeholder.
    assert torch.allclose(components @ components.t(), torch.eye(8), atol=1e-4)
    assert not torch.equal(components, torch.eye(8, components.shape[1]))


def test_frozen_stages_keep_their_pretrained_weights(images, tmp_path) -> None:
    config = tiny_config(steps=4, eval_every=4, freeze=["backbone.conv1", "backbone.bn1", "backbone.layer1"])
    train(config, images, images[:8], tmp_path / "frozen", read_image_file, device="cpu")
    torch.manual_seed(config.seed)  # the run seeds before building, so this rebuilds its starting weights
    start = create_embedder(config.embedder_config())
    trained = load_checkpoint(tmp_path / "frozen" / "last")
    before, after = start.state_dict(), trained.state_dict()
    for name, value in after.items():
        if name.startswith(("backbone.conv1.", "backbone.layer1.")):
            assert torch.equal(value, before[name]), name
    assert not torch.equal(after["backbone.layer4.0.conv1.weight"], before["backbone.layer4.0.conv1.weight"])
    with pytest.raises(ValueError, match="matches no parameter"):
        train(
            tiny_config(freeze=["backbone.nope"]), images, images[:8], tmp_path / "bad", read_image_file, device="cpu"
        )


def test_resume_after_a_kill(images, tmp_path) -> None:
    out = tmp_path / "run"
    config = tiny_config(steps=400, eval_every=1000, checkpoint_every=3)
    (tmp_path / "items.json").write_text(json.dumps(images))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(f"""
        import json
        from app.images import read_image_file
        from models.config import TrainConfig
        from models.train import train
        items = [tuple(i) for i in json.loads(open({str(tmp_path / "items.json")!r}).read())]
        config = TrainConfig.from_dict(json.loads(open({str(tmp_path / "config.json")!r}).read()))
        train(config, items, [], {str(out)!r}, read_image_file, device="cpu")
    """)
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "resume.pt").is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        proc.kill()  # SIGKILL: no chance to save anything on the way out
        proc.wait()
    saved = torch.load(out / "resume.pt", weights_only=False)["step"]
    assert saved > 0 and saved % 3 == 0
    resumed: list[int] = []
    config = tiny_config(steps=saved + 4, eval_every=1000, checkpoint_every=3)
    result = train(
        config,
        images,
        [],
        out,
        read_image_file,
        device="cpu",
        progress=lambda e: resumed.append(e["step"]) if e["event"] == "train" else None,
    )
    assert resumed == list(range(saved + 1, saved + 5)) and result.step == saved + 4


@pytest.mark.parametrize("arch", ["abe", "osme"])
def test_ensemble_archs_train_with_their_losses(arch, images, tmp_path) -> None:
    embedder = {
        "arch": arch,
        "backbone": "resnet10t",
        "dim": 32,
        "image_size": 32,
        "resize_size": 36,
        "extra": {"num_learners": 2, "num_parts": 2},
    }
    loss = {"name": "contrastive_xbm", "memory_size": 32, "divergence": 1.0} if arch == "abe" else {"name": "mamc"}
    result = train(
        tiny_config(embedder=embedder, loss=loss, steps=4, eval_every=4),
        images,
        images[:8],
        tmp_path / arch,
        read_image_file,
        device="cpu",
    )
    train_lines = [json.loads(x) for x in (tmp_path / arch / "log.jsonl").read_text().splitlines()]
    terms = {k for e in train_lines if e["event"] == "train" for k in e}
    assert ("divergence" in terms) if arch == "abe" else {"mamc", "softmax"} <= terms
    assert load_checkpoint(result.best_checkpoint_dir).config.arch == arch


def test_ddp_two_cpu_processes_with_gloo(images, tmp_path) -> None:
    config = tiny_config(steps=6, eval_every=3, checkpoint_every=3, batch_size=16)
    script = tmp_path / "ddp_train.py"
    script.write_text(
        textwrap.dedent(f"""
        import json
        import torch.distributed as dist
        from app.images import read_image_file
        from models.config import TrainConfig
        from models.train import train
        items = json.loads(open({str(tmp_path / "items.json")!r}).read())
        config = TrainConfig.from_dict(json.loads(open({str(tmp_path / "config.json")!r}).read()))
        items = [tuple(i) for i in items]
        result = train(config, items, items[:8], {str(tmp_path / "out")!r}, read_image_file, device="cpu")
        rank = dist.get_rank()
        with open({str(tmp_path)!r} + f"/rank{{rank}}.json", "w") as f:
            json.dump({{"world": dist.get_world_size(), "step": result.step}}, f)
        dist.destroy_process_group()
    """)
    )
    (tmp_path / "items.json").write_text(json.dumps(images))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks == [{"world": 2, "step": 6}, {"world": 2, "step": 6}]
    assert (tmp_path / "out" / "best" / "model.safetensors").is_file()


def test_recall_at_k_and_map_at_r_by_hand() -> None:
    # 1-D points on a circle: a at 0 deg, b at 10, c at 100, d at 110 (labels 0, 1, 0, 1).
    angles = np.deg2rad([0, 10, 100, 110])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    labels = np.array([0, 1, 0, 1])
    m = evaluate_embeddings(emb, labels, ks=(1, 2))
    # Neighbour order: a: b c d, b: a c d, c: d b a, d: c b a. The first is always of the other class
    # (R@1 = 0); the second is right for a (c) and d (b) only (R@2 = 0.5).
    assert m["recall@1"] == 0.0 and m["recall@2"] == 0.5
    # R = 1 same-class neighbour per query; it is never first: MAP@R = R-precision = 0.
    assert m["map@r"] == 0.0 and m["r_precision"] == 0.0
    perfect = evaluate_embeddings(emb, np.array([0, 0, 1, 1]), ks=(1,))
    assert perfect["recall@1"] == 1.0 and perfect["map@r"] == 1.0


def test_query_gallery_protocol_and_chunked_knn() -> None:
    rng = np.random.default_rng(1)
    gallery = rng.normal(size=(50, 8)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = gallery[:10] + 0.01
    m = evaluate_embeddings(queries, np.arange(10), (1, 5), gallery, np.arange(50))
    assert m["recall@1"] == 1.0
    chunked = knn(gallery, gallery, 4, exclude_self=True, chunk_size=7)
    whole = knn(gallery, gallery, 4, exclude_self=True)
    assert np.array_equal(chunked, whole) and not (chunked == np.arange(50)[:, None]).any()


def test_data_helpers(images, tmp_path) -> None:
    root = Path(images[0][0]).parents[1]
    items, names = folder_items(root)
    assert len(items) == 32 and names == [f"class_{i}" for i in range(4)]
    (tmp_path / "m.csv").write_text(
        "path,label\n" + "\n".join(f"{p},{n}" for p, n in [(items[0][0], "a"), (items[9][0], "b")])
    )
    csv, classes = csv_items(tmp_path / "m.csv")
    assert [y for _, y in csv] == [0, 1] and classes == ["a", "b"]
    train_part, val = split_items(items, 0.25, by="images")
    assert len(val) == 8 and {y for _, y in val} == {0, 1, 2, 3}
    train_part, val = split_items(items, 0.25, by="classes")
    assert len({y for _, y in val}) == 1 and not {y for _, y in val} & {y for _, y in train_part}
    batches = m_per_class_batches([y for _, y in items], 4, 8, 3, seed=5)
    assert batches == m_per_class_batches([y for _, y in items], 4, 8, 3, seed=5)
    assert all(len(b) == 8 and len({items[i][1] for i in b}) == 2 for b in batches)


def test_config_files_parse() -> None:
    for path in sorted((REPO / "configs").glob("*_cub100.yaml")):
        config = load_config(path, [parse_override("steps=3"), parse_override("lr=3e-5")])
        assert config.steps == 3 and config.lr == 3e-5
        embedder_config = config.embedder_config()
        assert embedder_config.backbone.startswith("tf_efficientnet_lite0")
        embedder_config.pretrained = "none"
        freeze_parameters(create_embedder(embedder_config), config.freeze)  # every pattern names real parameters


def test_eval_cli_scores_a_configs_validation_split_with_and_without_mirrors(images, tmp_path, capsys) -> None:
    model = create_embedder(tiny_config().embedder_config()).eval()
    save_checkpoint(model, tmp_path / "model")
    root = Path(images[0][0]).parents[1]
    config = tmp_path / "config.yaml"
    data = {"kind": "folder", "root": str(root), "train_classes": [0, 3], "val_fraction": 0.25, "val_split": "classes"}
    config.write_text(json.dumps({"embedder": {"arch": "irt"}, "data": data}))  # JSON is YAML

    model_dir = str(tmp_path / "model")
    split = ["--config", str(config), "--set", "data.val_split=images", "--split", "val"]
    assert retrieval_cli(["eval", "--model", model_dir, *split, "--flip-average"]) == 0
    printed = json.loads(capsys.readouterr().out)

    _, val = split_items([item for item in folder_items(root)[0] if item[1] < 3], 0.25, by="images")
    assert printed["num_queries"] == len(val) == 6  # 2 of each training class's 8: what training held out
    plain = evaluate_items(model, val, read_image_file, num_workers=0)
    model.config.flip_average = True
    mirrored = evaluate_items(model, val, read_image_file, num_workers=0)
    for key in ("recall@1", "map@r"):  # one run gives both, each the same as evaluating that way on its own
        assert printed[key] == pytest.approx(mirrored[key])
        assert printed["without_flip_average"][key] == pytest.approx(plain[key])

    with pytest.raises(SystemExit):  # a dataset and a config at once is ambiguous
        retrieval_cli(["eval", "--model", model_dir, "--config", str(config), "--root", str(root)])
    assert "exactly one of --root" in capsys.readouterr().err


def test_retrieval_verbose_train_runs_a_config_and_scores_its_test_classes(images, tmp_path, capsys) -> None:
    root = Path(images[0][0]).parents[1]
    config = tmp_path / "tiny.yaml"
    data = {"kind": "folder", "root": str(root), "train_classes": [0, 3], "test_classes": [3, 4],
            "val_fraction": 0.25}
    config.write_text(json.dumps({**tiny_config().to_dict(), "data": data}))  # JSON is YAML
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "app.cli", "-v", "train", "--config", str(config), "--out", str(out),
           "--device", "cpu", "--set", "steps=2", "--set", "eval_every=2", "--set", "batch_size=12"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert " DEBUG " in done.stderr  # -v before the sub-command turns on debug logging
    summary = json.loads((out / "test_metrics.json").read_text())
    assert summary["step"] == 2 and summary["num_test"] == 8 and "recall@1" in summary["test"]
    assert json.loads(done.stdout) == summary

    # A malformed --set is refused by the parser before anything runs (in-process: no torch import to wait for).
    with pytest.raises(SystemExit) as bad:
        retrieval_cli([*cmd[3:-2], "--set", "steps"])
    assert bad.value.code == 2 and "expected KEY=VALUE" in capsys.readouterr().err
