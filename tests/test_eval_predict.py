"""vitlab.eval and vitlab.predict on checkpoints of real runs: an image-folder run, and a
2-process DDP run on Fashion-MNIST compared with one process."""

import csv
import json

import pytest
import torch
from PIL import Image

from conftest import SLICE, run_entry
from imagegen import make_image_folder, write_image
from inprocess import assert_short_failure, run_in_process
# Imported here, not inside a test: Lightning binds its log handler to the stderr of the moment.
from vitlab.checkpoint import model_from_checkpoint
from vitlab.eval import main as eval_main
from vitlab.models import SimpleViT
from vitlab.module import ImageClassifier
from vitlab.predict import main as predict_main

TINY = ("model.dim=32", "model.depth=2", "model.heads=2", "model.dim_head=16", "model.mlp_dim=64", "torch_threads=1",
        "trainer.enable_progress_bar=false")


@pytest.fixture(scope="module", params=["in_memory", "streaming"])
def image_run(request, tmp_path_factory, data_dir):
    """A few steps of training on a generated image folder (3 classes, no test/ split), decoded
    into memory or streamed from the files."""
    work = tmp_path_factory.mktemp("image_run")
    root = make_image_folder(work / "photos", per_class=8)
    run_entry("vitlab.train", "data=imagefolder", f"data.root={root}", "data.image_size=16", "data.batch_size=8",
              f"data.in_memory={request.param == 'in_memory'}", "data.num_workers=0",
              "model.patch_size=4", "trainer.max_epochs=3", "name=photos", *TINY, cwd=work, data_dir=data_dir)
    return work, root, work / "outputs" / "runs" / "photos" / "checkpoints" / "last.ckpt"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_eval_and_predict_on_an_image_folder(image_run, data_dir):
    work, root, ckpt = image_run
    run_entry("vitlab.eval", f"ckpt_path={ckpt}", "name=photos", "torch_threads=1", cwd=work, data_dir=data_dir)
    out = work / "outputs" / "eval" / "photos"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["test_split_size"] == 24
    assert "no test/ folder: the test split is val/" in (out / "eval.log").read_text()
    matrix = read_csv(out / "confusion_matrix.csv")
    assert matrix[0] == ["true \\ predicted", "cat", "dog", "owl"]
    assert [row[0] for row in matrix[1:]] == ["cat", "dog", "owl"]
    assert all(sum(map(int, row[1:])) == 8 for row in matrix[1:])
    correct = sum(int(matrix[1 + i][1 + i]) for i in range(3))
    assert metrics["test/acc"] == pytest.approx(correct / 24)
    per_class = {row["class"]: row for row in csv.DictReader(open(out / "per_class_accuracy.csv"))}
    assert set(per_class) == {"cat", "dog", "owl"} and all(row["count"] == "8" for row in per_class.values())
    assert float(per_class["dog"]["accuracy"]) == pytest.approx(int(matrix[2][2]) / 8)
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"

    # Predict on the same val/ folder: the same images, the same model, the same answers.
    run_entry("vitlab.predict", f"ckpt_path={ckpt}", f"input={root / 'val'}", "name=photos", "torch_threads=1",
              cwd=work, data_dir=data_dir)
    rows = list(csv.DictReader(open(work / "outputs" / "predict" / "photos" / "predictions.csv")))
    assert list(rows[0]) == ["file", "class", "confidence"] and len(rows) == 24
    assert all(row["class"] in ("cat", "dog", "owl") and 1 / 3 <= float(row["confidence"]) <= 1 for row in rows)
    right = sum(row["class"] == row["file"].split("/")[-2] for row in rows)
    assert right == correct, "predict and eval disagree on the same images"


def test_predict_converts_any_image_and_names_bad_input(image_run, data_dir, tmp_path, monkeypatch, capsys):
    _, _, ckpt = image_run

    def run(*args):
        return run_in_process(predict_main, "vitlab.predict", [f"ckpt_path={ckpt}", *args], cwd=tmp_path,
                              data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys)

    # A large grayscale photo for an RGB 16x16 model.
    photo = write_image(tmp_path / "big photo.png", (230, 60, 60), 300, 200, seed=5, mode="L")
    assert run(f"input={photo}", "output=single.csv").returncode == 0
    (row,) = csv.DictReader(open(tmp_path / "single.csv"))
    assert row["file"] == str(photo) and row["class"] in ("cat", "dog", "owl")

    missing, docs = tmp_path / "nothing", tmp_path / "docs"
    assert_short_failure(run(f"input={missing}"), f"error: FileNotFoundError: input={missing} does not exist")
    docs.mkdir()
    (docs / "notes.txt").write_text("no images")
    assert_short_failure(run(f"input={docs}"), f"error: DataError: input={docs} holds no images")
    (docs / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    assert_short_failure(run(f"input={docs}"), f"error: BadImageError: {docs / 'broken.jpg'} cannot be read as an image")
    assert_short_failure(run(), "error: ValueError: input is not set")


def test_eval_names_a_dataset_that_does_not_fit_the_model(image_run, data_dir, tmp_path, monkeypatch, capsys):
    _, _, ckpt = image_run

    def run(*args):
        return run_in_process(eval_main, "vitlab.eval", args, cwd=tmp_path, data_dir=data_dir,
                              monkeypatch=monkeypatch, capsys=capsys)

    assert_short_failure(run(f"ckpt_path={ckpt}", "data=mnist"),
                         "the checkpoint's model takes 3-channel 16x16 images in 3 classes, "
                         "but the data gives 1-channel 28x28 images in 10 classes")
    assert_short_failure(run(), "error: ValueError: ckpt_path is not set")


def test_ddp_on_two_cpu_processes_matches_one_process_and_evaluates(tmp_path, data_dir):
    """trainer=ddp with 2 gloo processes, the same global batch (2 x 32) and steps as one process
    with 64: one run folder, test accuracy within the spread between seeds, and its checkpoint
    gives vitlab.eval the accuracy the run itself reported."""
    common = (*SLICE, *TINY, "model.patch_size=7", "scheduler=constant", "trainer.max_epochs=1",
              "trainer.limit_train_batches=80", "trainer.limit_val_batches=1", "data.eval_batch_size=256",
              "callbacks.model_checkpoint.monitor=null")
    # The test split's first 2048 images in both: 8 batches, or 4 per process.
    run_entry("vitlab.train", *common, "data.batch_size=64", "trainer.limit_test_batches=8", "name=one",
              cwd=tmp_path, data_dir=data_dir)
    run_entry("vitlab.train", *common, "trainer=ddp", "data.batch_size=32", "trainer.limit_test_batches=4", "name=ddp",
              cwd=tmp_path, data_dir=data_dir)
    runs = tmp_path / "outputs" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["ddp", "one"], "the second process joins the run's folder"
    one, ddp = (json.loads((runs / name / "metrics.json").read_text()) for name in ("one", "ddp"))
    assert one["status"] == ddp["status"] == "completed" and one["global_step"] == ddp["global_step"] == 80
    # Seeds 0, 1, 2 of the one-process run gave 0.565, 0.602, 0.570 (2048 test images).
    assert abs(ddp["test/acc"] - one["test/acc"]) < 0.06, (ddp["test/acc"], one["test/acc"])

    run_entry("vitlab.eval", f"ckpt_path={runs / 'ddp' / 'checkpoints' / 'last.ckpt'}", "trainer.limit_test_batches=8",
              "name=ddp", "torch_threads=1", cwd=tmp_path, data_dir=data_dir)
    out = tmp_path / "outputs" / "eval" / "ddp"
    evaluated = json.loads((out / "metrics.json").read_text())
    assert evaluated["test_split_size"] == 2048
    assert abs(evaluated["test/acc"] - ddp["test/acc"]) <= 2 / 2048
    names = [row["class"] for row in csv.DictReader(open(out / "per_class_accuracy.csv"))]
    assert names[:3] == ["T-shirt/top", "Trouser", "Pullover"] and len(names) == 10


def test_test_hflip_averages_the_probabilities_of_each_image_and_its_mirror():
    torch.manual_seed(0)
    net = SimpleViT(image_size=8, patch_size=4, num_classes=3, dim=16, depth=1, heads=2, dim_head=8, mlp_dim=16,
                    channels=1).eval()
    module = ImageClassifier(net=net, num_classes=3, optimizer=None)
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(module.test_logits(images), net(images)), "off by default"
        module.test_hflip = True
        expected = ((net(images).softmax(-1) + net(images.flip(-1)).softmax(-1)) / 2).log()
        torch.testing.assert_close(module.test_logits(images), expected)
        mirrored = torch.cat([images[..., :4], images[..., :4].flip(-1)], dim=-1)  # each its own mirror
        torch.testing.assert_close(module.test_logits(mirrored), net(mirrored).log_softmax(-1))
        # vitlab.predict goes through predict_step: the same logits as the test.
        torch.testing.assert_close(module.predict_step(images, 0), expected)


@pytest.mark.parametrize("test_hflip", [False, True])
def test_confusion_matrix_counts_what_the_test_accuracy_counts(test_hflip):
    """The confusion matrix (and so per-class accuracy) comes from the predictions that
    test/acc scores: with the flip, those of the averaged probabilities, not of the mirror."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from vitlab.eval import ConfusionMatrix

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))  # not mirror-symmetric
    module = ImageClassifier(net=net, num_classes=4, optimizer=None, test_hflip=test_hflip)
    images, labels = torch.randn(256, 1, 8, 8), torch.randint(0, 4, (256,))
    with torch.no_grad():
        predicted = module.test_logits(images).argmax(-1)
        assert not torch.equal(predicted, net(images.flip(-1)).argmax(-1)), "the mirror alone must predict otherwise"
    confusion = ConfusionMatrix(4)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[confusion], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    results = trainer.test(module, dataloaders=DataLoader(TensorDataset(images, labels), batch_size=64))[0]
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected.index_put_((labels, predicted), torch.ones(256, dtype=torch.long), accumulate=True)
    assert torch.equal(confusion.matrix, expected)
    assert confusion.matrix.trace().item() / 256 == pytest.approx(results["test/acc"])


def test_eval_tests_with_the_flip_on_request_and_as_the_run_was_trained(image_run, data_dir, tmp_path, monkeypatch,
                                                                        capsys):
    work, _, ckpt = image_run
    for flag, expected in (("null", False), ("true", True)):
        result = run_in_process(eval_main, "vitlab.eval", [f"ckpt_path={ckpt}", f"name=flip_{flag}", f"test_hflip={flag}"],
                                cwd=work, data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys)
        assert result.returncode == 0, result.stderr[-2000:]
        metrics = json.loads((work / "outputs" / "eval" / f"flip_{flag}" / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["test_hflip"] is expected

    # A run trained with module.test_hflip=true keeps it in the checkpoint's hyperparameters.
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["test_hflip"] = True
    torch.save(checkpoint, tmp_path / "flip.ckpt")
    assert model_from_checkpoint(tmp_path / "flip.ckpt")[0].test_hflip is True
    assert model_from_checkpoint(ckpt)[0].test_hflip is False
    # An explicit choice (eval's and predict's test_hflip=true|false) wins over the run's.
    assert model_from_checkpoint(tmp_path / "flip.ckpt", test_hflip=False)[0].test_hflip is False
    assert model_from_checkpoint(ckpt, test_hflip=True)[0].test_hflip is True


def test_predict_with_the_flip_gives_an_image_and_its_mirror_the_same_answer(image_run, data_dir, tmp_path, monkeypatch,
                                                                            capsys):
    _, _, ckpt = image_run
    photo = write_image(tmp_path / "photos" / "a.png", (200, 40, 90), 40, 30, seed=3)
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "photos" / "b.png")

    def predictions(flag):
        result = run_in_process(predict_main, "vitlab.predict", [f"ckpt_path={ckpt}", f"input={tmp_path / 'photos'}",
                                                                 f"output=flip_{flag}.csv", f"test_hflip={flag}"],
                                cwd=tmp_path, data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys)
        assert result.returncode == 0, result.stderr[-2000:]
        return [(row["class"], row["confidence"]) for row in csv.DictReader(open(tmp_path / f"flip_{flag}.csv"))]

    plain, flipped = predictions("false"), predictions("true")
    assert plain[0] != plain[1], "the plain model tells an image from its mirror"
    assert flipped[0] == flipped[1], "with the flip, an image and its mirror average the same two predictions"
    assert predictions("null") == plain, "null predicts as the run tested (without the flip)"


def test_a_flexivit_checkpoint_evaluates_at_every_patch_size(tmp_path, data_dir):
    """Trained with patch sizes [4, 7] (one drawn per step), one checkpoint is tested at both, in
    training's own test and in vitlab.eval, which also reads it at another image size; at the
    model's own patch size the variant is the plain test."""
    run_entry("vitlab.train", *SLICE, "model.patch_norm=false", "model.flexi_patch_sizes=[4,7]", "name=flexi", *TINY,
              cwd=tmp_path, data_dir=data_dir)
    trained = json.loads((tmp_path / "outputs" / "runs" / "flexi" / "metrics.json").read_text())
    assert trained["status"] == "completed" and trained["test/acc@p4"] == trained["test/acc"]
    assert 0 < trained["test/acc@p7"] <= 1
    ckpt = tmp_path / "outputs" / "runs" / "flexi" / "checkpoints" / "last.ckpt"
    run_entry("vitlab.eval", f"ckpt_path={ckpt}", "name=flexi", "image_sizes=[56]",
              "torch_threads=1", cwd=tmp_path, data_dir=data_dir)
    evaluated = json.loads((tmp_path / "outputs" / "eval" / "flexi" / "metrics.json").read_text())
    assert {"test/acc@p4", "test/acc@p7", "test/acc@56px"} <= set(evaluated)
    assert evaluated["test/acc@p4"] == evaluated["test/acc"] and evaluated["positions"] == "extend"
    # The 56 px patches spread over the trained grid instead; the patch sizes' positions are the same.
    run_entry("vitlab.eval", f"ckpt_path={ckpt}", "name=flexi_interpolated", "image_sizes=[56]",
              "positions=interpolate", "torch_threads=1", cwd=tmp_path, data_dir=data_dir)
    interpolated = json.loads((tmp_path / "outputs" / "eval" / "flexi_interpolated" / "metrics.json").read_text())
    assert interpolated["positions"] == "interpolate"
    assert interpolated["test/acc@p7"] == evaluated["test/acc@p7"] and 0 < interpolated["test/acc@56px"] <= 1
