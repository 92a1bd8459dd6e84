"""Write a dataset as LitData shards: ``python -m vitlab.prepare data=<dataset> output=<dir>``.

Any dataset of ``conf/data/`` is read as it would be for training (image folders by their
files, the others into memory) and each split is written by ``litdata.optimize`` in parallel
processes, with a progress bar, into ``<output>/<split>/``, then ``<output>/vitlab.json``
(``vitlab.data.shards``). ``output`` may be ``s3://bucket/prefix``. Train from the result with
``python -m vitlab.train data=shards data.root=<output>``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from vitlab.config import CONFIG_PATH, quote_path_overrides, register_resolvers
from vitlab.data.shards import is_remote, write_shards
from vitlab.errors import entry_point

log = logging.getLogger(__name__)
register_resolvers()


def prepare(cfg: DictConfig) -> dict:
    if not cfg.get("output"):
        raise ValueError("output is not set: python -m vitlab.prepare data=<dataset> output=<new folder or "
                         "s3://bucket/prefix>")
    if cfg.get("torch_threads"):
        torch.set_num_threads(cfg.torch_threads)
    datamodule = hydra.utils.instantiate(cfg.data)
    options = OmegaConf.to_container(cfg.storage_options, resolve=True) if cfg.get("storage_options") else None
    output = str(cfg.output) if is_remote(str(cfg.output)) else str(Path(str(cfg.output)).expanduser().resolve())
    meta = write_shards(datamodule, output, num_workers=cfg.get("num_workers"), chunk_bytes=cfg.chunk_bytes,
                        seed=cfg.seed, storage_options=options, source=cfg.data.get("_target_"))
    sizes = ", ".join(f"{split} {n}" for split, n in meta["splits"].items())
    log.info(f"{len(meta['classes'])} classes, {sizes} samples written to {output}; "
             f"train with: python -m vitlab.train data=shards data.root={output}")
    return meta


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="prepare")
@entry_point
def main(cfg: DictConfig) -> None:
    prepare(cfg)


if __name__ == "__main__":
    sys.argv = quote_path_overrides(sys.argv)
    main()
