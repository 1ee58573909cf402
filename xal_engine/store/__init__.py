"""Everything xal-engine stores, each format with one owner module:

    location.py    where a pool lives: a local path or an object-store URL (s3://, gs://, az://) -> a store
    format.py      the pool format (version 1): arrays, dtypes, codecs, attributes, structure checks
    pool.py        Pool: open a pool and read it (ranges, whole columns, AL experiments)
    writer.py      PoolWriter: write a new pool chunk by chunk into <pool>.partial, then rename (on an
                   object store: in place, completion published last in zarr.json)
    validate.py    decode every chunk and check every value (`pool validate`)
    info.py        the pool's summary (`pool info`)
    al_state.py    an AL experiment's state under al/<experiment>/
    score_run.py   a scoring run's results under scores/<run>/ (fields from xal_engine.core.fields)
    dataset.py     loader datasets over pool ranges (training blocks, scoring units)
    run_folder.py  the run folder of `xal-engine loop` (config, metrics, per-round batches, models)
    files.py       atomic file replacement and JSON-safe values shared by the file formats

Callers reach the pool through these names (``from xal_engine.store import Pool``).
"""

from xal_engine.store.al_state import ALExperiment
from xal_engine.store.format import (
    AL_GROUP,
    COLUMNS,
    FORMAT_VERSION,
    FORMAT_VERSIONS,
    IMAGE_DTYPES,
    LABELLED_ROUND,
    PARTIAL_SUFFIX,
    PER_IMAGE_ARRAYS,
    SCORES_GROUP,
    SPLIT_NAMES,
    SPLIT_TEST,
    SPLIT_TRAIN,
    SPLIT_VAL,
    VOLUME_FORMAT_VERSION,
    StorageConfig,
    images_per_chunk,
    partial_path,
)
from xal_engine.store.pool import Pool, PoolBatch
from xal_engine.store.writer import PoolWriter

__all__ = [
    "AL_GROUP", "COLUMNS", "FORMAT_VERSION", "FORMAT_VERSIONS", "IMAGE_DTYPES", "LABELLED_ROUND", "PARTIAL_SUFFIX", "PER_IMAGE_ARRAYS",
    "SCORES_GROUP", "SPLIT_NAMES", "SPLIT_TEST", "SPLIT_TRAIN", "SPLIT_VAL", "VOLUME_FORMAT_VERSION",
    "ALExperiment", "Pool", "PoolBatch", "PoolWriter", "StorageConfig", "images_per_chunk", "partial_path",
]
