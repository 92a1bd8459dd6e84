"""Datasets as LitData shards: written once by ``python -m vitlab.prepare``, then streamed from a
local folder or an S3 bucket by ``data=shards``.

Layout of ``<root>`` (a folder or ``s3://bucket/prefix``)::

    <root>/vitlab.json                 class names, split sizes, where the data came from
    <root>/{train,val[,test]}/         one LitData dataset per split (index.json, chunk-*.bin)

Each sample is ``{"image": uint8 array, "label": int, "name": bytes}``: the encoded image exactly
as it was on disk (JPEG, PNG, ... file bytes, never re-encoded), or for the in-memory datasets
(MNIST, CIFAR, synthetic), which have no files, the pixels encoded losslessly as PNG. ``name``
is the source file relative to the source folder (or ``<split>/<index>``) and names the sample
in messages; it is stored as bytes because LitData would read a string naming an existing file
as that file. The image bytes are stored as a numpy array: with pyarrow installed, LitData
stores a sample of bytes, ints and strings only as an Arrow table at the chunk's end, which its
reads from S3 then miss (the item comes back empty; litdata 0.2.76). Samples are written in a
seeded random order, so that every chunk mixes all classes (LitData shuffles chunks and the
samples inside each chunk, not across chunks).

Reading (``ShardsDataModule``): LitData's ``StreamingDataset`` and ``StreamingDataLoader``,
shuffled per epoch from ``seed``, each image decoded and cropped as a streamed image folder's
(``vitlab.data.transforms``); the training loader's position travels in Lightning's
checkpoints, so a run stopped mid-epoch resumes with the batches it would have drawn.

Beyond LitData's public API this module relies on ``ChunkedIndex`` and a dataset's
``worker_intervals`` (replacing an unreadable sample within its chunk) and on
``litdata.streaming.downloader._OBSTORE_INIT_PID`` (plain-http S3 endpoints); the tests of
``on_bad_file=skip`` and of S3 fail if they change.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.sampler import ChunkedIndex

from vitlab.data.base import InMemoryImageDataModule, InMemoryImages
from vitlab.errors import BadImageError, DataError
from vitlab.data.imagefolder import STATISTICS_SAMPLE, ImageFolderDataModule, use_statistics
from vitlab.data.loading import BAD_FILE_POLICIES, MAX_REPLACEMENTS, collate_samples, sample_seed
from vitlab.data.transforms import SampleTransform, check_transform_options, decode

log = logging.getLogger(__name__)

META_FILE = "vitlab.json"
SPLITS = ("train", "val", "test")
FORMAT = "vitlab-shards"
VERSION = 1
LAYOUT = (f"a folder written by `python -m vitlab.prepare data=<dataset> output=<dir>`: {META_FILE} and one "
          f"LitData dataset per split (train/, val/, optional test/)")


# --- where the shards are: a local folder or s3:// -------------------------------------------

def is_remote(root: str) -> bool:
    return "://" in str(root)


def join(root: str, *parts: str) -> str:
    if is_remote(root):
        return "/".join([str(root).rstrip("/"), *parts])
    return str(Path(str(root)).expanduser().joinpath(*parts))


def _s3_client(storage_options: Mapping[str, Any] | None):
    """A boto3 S3 client from LitData's ``storage_options`` (boto3 client arguments such as
    ``endpoint_url``); credentials and endpoint otherwise come from the usual AWS variables."""
    import boto3
    import botocore.config

    options = dict(storage_options or {})
    # Fail in seconds on an unreachable endpoint (LitData's own client retries for minutes).
    options.setdefault("config", botocore.config.Config(retries={"max_attempts": 2}, connect_timeout=10))
    return boto3.client("s3", **options)


def _bucket_key(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if parsed.scheme != "s3":
        raise DataError(f"{url}: shards are read from a local folder or s3://bucket/prefix, not {parsed.scheme}://.")
    return parsed.netloc, parsed.path.lstrip("/")


def _s3_error(url: str, err: Exception) -> DataError:
    """One line for what went wrong reaching an S3 object."""
    import botocore.exceptions as bx

    if isinstance(err, bx.NoCredentialsError):
        return DataError(f"{url}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and "
                         f"AWS_ENDPOINT_URL for a server other than AWS), or pass them in data.storage_options.")
    if isinstance(err, bx.EndpointConnectionError):
        return DataError(f"{url}: the S3 endpoint cannot be reached ({err}): check AWS_ENDPOINT_URL or "
                         f"data.storage_options.endpoint_url.")
    if isinstance(err, bx.ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return DataError(f"{url}: the bucket {urlparse(url).netloc} does not exist: check data.root.")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return DataError(f"{url}: access denied ({code}): check the credentials (AWS_ACCESS_KEY_ID, "
                             f"AWS_SECRET_ACCESS_KEY) and the bucket's permissions.")
    return DataError(f"{url} cannot be read ({err}).")


def _s3(method: str, url: str, storage_options: Mapping[str, Any] | None, **kwargs) -> Any:
    """One boto3 call on the object at ``url`` (``get_object``: its text); ``FileNotFoundError``
    if a read finds no object there, else a ``DataError`` saying what went wrong."""
    import botocore.exceptions as bx

    bucket, key = _bucket_key(url)
    try:
        response = getattr(_s3_client(storage_options), method)(Bucket=bucket, Key=key, **kwargs)
        return response["Body"].read().decode() if method == "get_object" else response
    except (bx.BotoCoreError, bx.ClientError) as err:
        code = err.response.get("Error", {}).get("Code") if isinstance(err, bx.ClientError) else None
        if method != "put_object" and code in ("NoSuchKey", "404", "NotFound"):
            raise FileNotFoundError(url) from None
        raise _s3_error(url, err) from None


def read_text(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """A small text file, local or on S3; ``FileNotFoundError`` if it is not there."""
    return _s3("get_object", url, storage_options) if is_remote(url) else Path(url).read_text()


def write_text(url: str, text: str, storage_options: Mapping[str, Any] | None = None) -> None:
    if is_remote(url):
        _s3("put_object", url, storage_options, Body=text.encode())
        return
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    Path(url).write_text(text)


def exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    if not is_remote(url):
        return Path(url).is_file()
    try:
        _s3("head_object", url, storage_options)
    except FileNotFoundError:
        return False
    return True


def use_sdk_for_plain_http(storage_options: Mapping[str, Any] | None = None) -> bool:
    """LitData 0.2.76 moves chunks with obstore when it can, and builds obstore's S3 store
    without ``allow_http``, so an ``http://`` endpoint (a local S3-compatible server, MinIO
    without TLS) fails with "BadScheme"; its boto3 path works. For such an endpoint, mark
    obstore unusable in this process (and the workers it forks), which sends LitData's
    transfers through boto3. LitData's one private name used here (tests/test_shards.py fails if
    it goes away)."""
    endpoint = ((storage_options or {}).get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL") or "")
    if not str(endpoint).startswith("http://"):
        return False
    from litdata.streaming import downloader

    if downloader.obstore_usable():
        downloader._OBSTORE_INIT_PID = -1  # "started by another process": LitData falls back to boto3
        log.info(f"S3 endpoint {endpoint} is plain http: LitData's transfers go through boto3")
    return True


def read_meta(root: str | None, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``<root>/vitlab.json``, with every split it lists present: the layout is checked here,
    before anything trains, and a problem is one ``DataError`` naming the path."""
    if not root:
        raise DataError(f"data=shards needs data.root=<dir or s3://bucket/prefix>: {LAYOUT}.")
    root = str(root)
    if not is_remote(root) and not Path(root).expanduser().is_dir():
        raise DataError(f"data.root={root} does not exist: point it at {LAYOUT}.")
    where = join(root, META_FILE)
    try:
        meta = json.loads(read_text(where, storage_options))
    except FileNotFoundError:
        raise DataError(f"data.root={root} has no {META_FILE}: it is not (or not yet completely) {LAYOUT}.") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{where} is not valid JSON ({err}): write the shards again with "
                        f"python -m vitlab.prepare.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not meta.get("classes"):
        raise DataError(f"{where} does not describe vitlab shards: write them with python -m vitlab.prepare.")
    splits = meta.get("splits") or {}
    for split in ("train", "val"):
        if split not in splits:
            raise DataError(f"{where} lists no {split} split: shards need train and val (write them again with "
                            f"python -m vitlab.prepare).")
    for split in splits:
        index = join(root, split, "index.json")
        if not exists(index, storage_options):
            raise DataError(f"data.root={root} has no shards for its {split} split ({index} is missing): "
                            f"the copy is incomplete; copy or write it again.")
    return meta


def shard_classes(root: str | None, storage_options: Mapping[str, Any] | None = None) -> int | None:
    """Number of classes of the shards at ``root`` (``${vitlab.shard_classes:${data.root}}``),
    or null if it cannot be read: the datamodule then says what is wrong."""
    if not root:
        return None
    try:
        options = dict(storage_options) if isinstance(storage_options, Mapping) and storage_options else None
        return len(json.loads(read_text(join(str(root), META_FILE), options))["classes"])
    except (OSError, ValueError, KeyError, TypeError, DataError):
        return None


# --- writing (python -m vitlab.prepare) ------------------------------------------------------

class FileSamples:
    """``sample(i)`` for image files: the file's bytes as they are, its label and its name."""

    def __init__(self, files: Sequence[tuple[Path, int]], base: Path):
        self.paths = [str(path) for path, _ in files]
        self.labels = [int(label) for _, label in files]
        self.base = base

    def __len__(self) -> int:
        return len(self.paths)

    def __call__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        return {"image": np.frombuffer(Path(path).read_bytes(), dtype=np.uint8), "label": self.labels[index],
                "name": os.fsencode(os.path.relpath(path, self.base))}


class TensorSamples:
    """``sample(i)`` for uint8 images held in memory: lossless PNG bytes."""

    def __init__(self, dataset: InMemoryImages, split: str):
        self.images, self.labels, self.split = dataset.images, dataset.labels, split

    def __len__(self) -> int:
        return len(self.images)

    def __call__(self, index: int) -> dict[str, Any]:
        from torchvision.io import encode_png

        data = encode_png(self.images[index].contiguous()).numpy()
        return {"image": data, "label": int(self.labels[index]), "name": f"{self.split}/{index}".encode()}


def sources(datamodule) -> dict[str, FileSamples | TensorSamples]:
    """The samples of each split of a vitlab datamodule: files for image folders, PNG-encoded
    pixels for the datasets held in memory."""
    if isinstance(datamodule, ShardsDataModule):
        raise DataError(f"data.root={datamodule.root} already holds shards: copy the folder instead of "
                        f"writing it again.")
    if isinstance(datamodule, ImageFolderDataModule):
        return {split: FileSamples(files, datamodule.root) for split, files in datamodule.files.items()}
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    sets = {"train": datamodule.train_set, "val": datamodule.val_set, "test": datamodule.test_set}
    if sets["test"] is sets["val"]:
        del sets["test"]
    out = {}
    for split, dataset in sets.items():
        if dataset is None:
            continue
        if not isinstance(dataset, InMemoryImages):
            raise DataError(f"{type(datamodule).__name__} gives {type(dataset).__name__} for its {split} split, "
                            f"which cannot be written as shards: use an image folder or a dataset held in memory.")
        out[split] = TensorSamples(dataset, split)
    return out


def write_split(samples, output_dir: str, *, seed: int, num_workers: int, chunk_bytes: str | int,
                storage_options: Mapping[str, Any] | None = None) -> None:
    """One split as a LitData dataset, written by ``num_workers`` processes (LitData's
    progress bar), in a seeded random order that is the same for any number of processes
    (each process writes one contiguous slice of the order, and the index lists the slices in
    turn)."""
    import litdata

    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    litdata.optimize(
        fn=samples, inputs=order, output_dir=output_dir, chunk_bytes=chunk_bytes, num_workers=num_workers,
        # fork: the workers inherit the samples instead of importing and unpickling them.
        start_method="fork" if os.name == "posix" else None,
        # Static slices instead of LitData's shared work queue, whose order depends on timing.
        keep_data_ordered=True,
        storage_options=dict(storage_options or {}),
    )


def write_shards(datamodule, output: str, *, num_workers: int | None = None, chunk_bytes: str | int = "64MB",
                 seed: int = 0, storage_options: Mapping[str, Any] | None = None,
                 source: str | None = None) -> dict[str, Any]:
    """Every split of ``datamodule`` as shards in ``output``, then ``output/vitlab.json`` (last,
    so a folder without it is known to be incomplete)."""
    output = str(output)
    if not is_remote(output):
        output = str(Path(output).expanduser().resolve())
    for name in (META_FILE, *(f"{split}/index.json" for split in SPLITS)):
        if exists(join(output, name), storage_options):
            raise DataError(f"output={output} already holds shards ({name}): choose a new folder or delete it first.")
    if is_remote(output):
        use_sdk_for_plain_http(storage_options)
    splits = sources(datamodule)
    workers = num_workers or os.cpu_count() or 1
    for split, samples in splits.items():
        log.info(f"{split}: {len(samples)} samples -> {join(output, split)} ({workers} processes)")
        write_split(samples, join(output, split), seed=seed, num_workers=min(workers, len(samples)),
                    chunk_bytes=chunk_bytes, storage_options=storage_options)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "classes": [str(c) for c in datamodule.class_names],
        "splits": {split: len(samples) for split, samples in splits.items()},
        "channels": int(datamodule.channels),
        "image_size": int(datamodule.image_size),
        "encoding": "file bytes" if isinstance(datamodule, ImageFolderDataModule) else "png",
        "source": source or type(datamodule).__name__,
    }
    write_text(join(output, META_FILE), json.dumps(meta, indent=2) + "\n", storage_options)
    return meta


# --- reading (data=shards) -------------------------------------------------------------------

class ShardDataset(StreamingDataset):
    """One split of the shards, read by LitData: ``next(iter(dataset)) -> (image, label, skipped)``
    with ``image`` decoded and transformed (uint8 ``(C, S, S)``) and ``skipped`` the names of
    unreadable samples replaced under ``on_bad_file=skip``.

    In training each sample's crop and flip are seeded from ``seed``, LitData's epoch and the
    sample's index in the shards, so they do not depend on the worker that reads it. A sample
    that cannot be decoded is replaced, under ``skip``, by another of the same chunk part that
    this worker reads, drawn from the sample's seed (a resumed run replaces it the same way).
    """

    def __init__(self, input_dir: str, *, channels: int, transform: SampleTransform, train: bool, split: str,
                 on_bad_file: str = "error", seed: int = 0, **kwargs):
        super().__init__(input_dir, shuffle=train, seed=seed, **kwargs)
        # Not ``self.transform``: StreamingDataset applies that one to the raw sample itself.
        self.sample_transform = transform
        self.channels, self.train, self.split, self.on_bad_file = channels, train, split, on_bad_file

    def _decode(self, raw: dict[str, Any], index: int) -> tuple[torch.Tensor, int]:
        seed = sample_seed(self.seed, self.current_epoch, index) if self.train else None
        image = decode(raw["image"], self.channels, name=self.describe(raw))
        return self.sample_transform(image, seed), int(raw["label"])

    def describe(self, raw: dict[str, Any]) -> str:
        return f"{os.fsdecode(bytes(raw['name']))} (shards {self.input_dir.url or self.input_dir.path})"

    def __getitem__(self, index):
        if isinstance(index, int):  # random access (statistics): no replacement
            image, label = self._decode(super().__getitem__(index), index)
            return image, label, []
        if not isinstance(index, ChunkedIndex):
            return super().__getitem__(index)
        # The last sample of a chunk part lets LitData release the chunk; hold that back until
        # any replacement has been read from the chunk.
        first = ChunkedIndex(index.index, index.chunk_index, index.chunk_size, index.chunk_indexes, False)
        raw, current, skipped = super().__getitem__(first), index.index, []
        rng = random.Random(sample_seed(self.seed, self.current_epoch, index.index))
        try:
            for _ in range(MAX_REPLACEMENTS + 1):
                try:
                    image, label = self._decode(raw, current)
                    return image, label, skipped
                except BadImageError:
                    if self.on_bad_file != "skip":
                        raise
                    skipped.append(self.describe(raw))
                    # This worker's part of the current chunk: (chunk start, first, end, chunk end).
                    part = self.worker_intervals[self.worker_next_chunk_index - 1]
                    current = rng.randrange(part[1], part[2])
                    raw = super().__getitem__(ChunkedIndex(current, index.chunk_index))
            raise BadImageError(f"{MAX_REPLACEMENTS + 1} samples in a row of chunk {index.chunk_index} of "
                                f"{self.input_dir.url or self.input_dir.path} cannot be decoded: the shards are "
                                f"damaged beyond data.on_bad_file=skip; write them again.")
        finally:
            if index.is_last_index:
                super().__getitem__(index)


class ResumableStreamingDataLoader(StreamingDataLoader):
    """LitData's loader, restored by the datamodule rather than by Lightning's fit loop.

    Lightning hands a checkpoint's loader state to the training loader only if the loader is
    made after the loops are restored; once ``configure_optimizers`` asks for
    ``trainer.estimated_stepping_batches`` (vitlab's schedules do), it is made before, and the
    state is dropped without a word (measured with lightning 2.6.6 and litdata 0.2.76; LitData
    issue #775). ``ShardsDataModule`` keeps the state in its own ``state_dict`` and calls
    ``resume_from``; Lightning's own call is ignored, so the state is applied exactly once.
    """

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def resume_from(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)


class ShardsDataModule(InMemoryImageDataModule):
    """Shards written by ``vitlab.prepare`` at ``root`` (a folder or ``s3://bucket/prefix``).

    The constructor arguments are those of the streaming image folder. Class names come from
    ``vitlab.json``; without a test split the test split is val. ``mean``/``std`` null: computed
    on a seeded sample of ``STATISTICS_SAMPLE`` training images. ``num_workers`` null:
    min(4, cores). ``storage_options``: LitData's (boto3 client arguments for S3, e.g.
    ``endpoint_url``); ``cache_dir``: where remote chunks are cached (null: LitData's default).

    Under DDP LitData gives every rank the same number of whole training batches, so each epoch
    leaves out the last ``len(train) mod (world size x batch size)`` samples (another few each
    epoch, as the chunks are reshuffled). Evaluation reads every sample once across the ranks
    (no padding), the last rank taking the remainder.
    """

    #: Read per sample in loader workers (``vitlab.predict`` then resizes as evaluation did).
    streaming = True

    def __init__(self, *, root: str | None, image_size: int, channels: int = 3, num_classes: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, resize: str = "crop",
                 train_crop: str = "random_resized", scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: bool = True, crop_pct: float = 0.875,
                 on_bad_file: str = "error", num_workers: int | None = None,
                 storage_options: Mapping[str, Any] | None = None, cache_dir: str | None = None, **kwargs):
        if channels not in (1, 3):
            raise ValueError(f"data.channels={channels}: shards are decoded as RGB (3) or grayscale (1).")
        if on_bad_file not in BAD_FILE_POLICIES:
            raise ValueError(f"data.on_bad_file={on_bad_file} is not one of {list(BAD_FILE_POLICIES)}.")
        check_transform_options(image_size=image_size, train_crop=train_crop, scale=scale, crop_pct=crop_pct,
                                resize=resize)
        self.storage_options = dict(storage_options) if storage_options else None
        self.root = str(root) if root and is_remote(str(root)) else str(Path(str(root)).expanduser()) if root else None
        self.meta = read_meta(self.root, self.storage_options)
        if is_remote(self.root):
            use_sdk_for_plain_http(self.storage_options)
        classes = list(self.meta["classes"])
        if num_classes is not None and num_classes != len(classes):
            raise ValueError(f"data.num_classes={num_classes} but {join(self.root, META_FILE)} lists {len(classes)} "
                             f"classes: leave data.num_classes at its default (read from {META_FILE}).")
        self.splits = dict(self.meta["splits"])
        self.computed_stats = mean is None or std is None
        self.on_bad_file = on_bad_file
        self.cache_dir = cache_dir
        super().__init__(image_size=image_size, channels=channels, num_classes=len(classes), class_names=classes,
                         # Placeholders until setup computes the training images' statistics.
                         mean=[0.5] * channels if self.computed_stats else mean,
                         std=[0.25] * channels if self.computed_stats else std,
                         num_workers=min(4, os.cpu_count() or 1) if num_workers is None else num_workers, **kwargs)
        self.collate_fn = collate_samples
        options = dict(resize=resize, crop_pct=crop_pct, scale=scale, ratio=ratio, train_crop=train_crop)
        self.train_transform = SampleTransform(image_size, train=True, hflip=hflip, **options)
        self.eval_transform = SampleTransform(image_size, train=False, **options)
        self._train_loader: ResumableStreamingDataLoader | None = None
        self._loader_state: dict[str, Any] | None = None

    @property
    def test_split(self) -> str:
        return "test" if "test" in self.splits else "val"

    def _dataset(self, split: str, train: bool, transform: SampleTransform | None = None) -> ShardDataset:
        return ShardDataset(
            join(self.root, split), channels=self.channels,
            transform=transform or (self.train_transform if train else self.eval_transform),
            train=train, split=split, on_bad_file=self.on_bad_file, seed=self.seed,
            storage_options=self.storage_options, cache_dir=self.cache_dir,
            # Every evaluation sample once across the ranks: LitData's default (None) under DDP
            # would drop the remainder to give each rank as many as the others.
            drop_last=None if train else False)

    def setup(self, stage: str | None = None) -> None:
        # Built here, not in __init__: LitData reads the DDP rank and world size when a dataset
        # is made, and Lightning has set up the processes by now.
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self._dataset("val", train=False)
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._dataset("train", train=True)
        if self.computed_stats:
            self._set_statistics()
        if stage in (None, "test") and self.test_set is None:
            if self.test_split == "val":
                log.info(f"{self.root} has no test split: the test split is val.")
            self.test_set = self._dataset(self.test_split, train=False)

    def _set_statistics(self) -> None:
        dataset = self._dataset("train", train=False, transform=self.eval_transform)
        total = self.splits["train"]
        count = min(total, STATISTICS_SAMPLE)
        picks = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed))[:count].tolist()
        images = []
        for index in picks:
            try:
                images.append(dataset[int(index)][0])
            except BadImageError:
                if self.on_bad_file != "skip":
                    raise
        use_statistics(self, torch.stack(images), f"{len(images)} of the {total} training images of {self.root}")

    def _streaming_loader(self, dataset: ShardDataset | None, batch_size: int,
                          cls: type[StreamingDataLoader] = StreamingDataLoader) -> StreamingDataLoader:
        if dataset is None:
            raise RuntimeError("the datamodule has not been set up for this stage")
        return cls(
            dataset, batch_size=batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory,
            collate_fn=self.collate_fn,
            # Fresh workers each epoch: they take the dataset's epoch (and a resumed state) from
            # the main process; persistent ones would keep the first copy.
            persistent_workers=False,
            # The loader's own generator: starting an epoch never draws from the global one,
            # which the on-device augmentation uses (and checkpoints restore).
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> StreamingDataLoader:
        loader = self._streaming_loader(self.train_set, self.batch_size, ResumableStreamingDataLoader)
        if self._loader_state is not None:
            loader.resume_from(self._loader_state)
            self._loader_state = None
        self._train_loader = loader
        return loader

    def _eval_batch_size(self, split: str) -> int:
        """Under DDP the ranks read every evaluation sample once, the last rank the remainder,
        so they may take different numbers of batches; each must take at least one (its first
        forward pass joins the others in DDP's buffer broadcast): the batch is capped at
        ``len(split) // world size``."""
        world = self.trainer.world_size if self.trainer is not None else 1
        size = self.splits[split]
        if world == 1 or size // world >= self.eval_batch_size:
            return self.eval_batch_size
        if size < world:
            raise ValueError(f"the {split} split of {self.root} has {size} samples, fewer than the {world} DDP "
                             f"processes: write more samples into it, or evaluate with fewer devices.")
        log.info(f"{split}: batches of {size // world} (not data.eval_batch_size={self.eval_batch_size}) so that each "
                 f"of the {world} processes evaluates at least one")
        return size // world

    def val_dataloader(self) -> StreamingDataLoader:
        return self._streaming_loader(self.val_set, self._eval_batch_size("val"))

    def test_dataloader(self) -> StreamingDataLoader:
        return self._streaming_loader(self.test_set, self._eval_batch_size(self.test_split))

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the training loader's position in the epoch (LitData's
        state: the epoch, the samples yielded, the worker that gave the last batch)."""
        state = super().state_dict()
        loader, trainer = self._train_loader, self.trainer
        if loader is None or trainer is None:
            return state
        position = loader.state_dict()
        if math.ceil(position["num_samples_yielded"] / self.batch_size) >= trainer.num_training_batches:
            # At the end of an epoch (all of it, or trainer.limit_train_batches of it): the
            # next one starts afresh, as it would have without the interruption.
            position = {**position, "num_samples_yielded": 0}
        return {**state, "train_loader": position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores the datamodule before it asks for the training loader.
        super().load_state_dict(state_dict)
        self._loader_state = state_dict.get("train_loader")

    def describe_file(self, item, split: str) -> str:
        return str(item)  # shards report a skipped sample by its stored name
