"""The console without the noise users do not need (``flux-ray`` without ``-v``).

A CPU demo printed hundreds of lines before: library warnings in every Ray worker (torchao, bitsandbytes,
transformers, torch's pytree), Ray Data's execution plans, Ray Train's per-report INFO lines. Quiet mode keeps
flux_ray's own INFO lines, the progress lines and every ERROR; ``-v`` shows everything as before.

Ray Train's own lines follow RunConfig's LoggingConfig (train/driver.py). Workers get the rest two ways:
environment variables that libraries read at import (inherited by a local Ray's workers), and ``quiet_process``
run by the worker setup hook (``flux_ray.job.setup_worker``).
"""
from __future__ import annotations

import logging
import os
import warnings

QUIET_FLAG = "FLUX_RAY_QUIET"
QUIET_ENV = {
    QUIET_FLAG: "1",
    "PYTHONWARNINGS": "ignore",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "RAY_DEDUP_LOGS": "1",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}
NOISY_LOGGERS = ("ray", "mlflow", "alembic", "torch", "torchao", "bitsandbytes", "DeepSpeed", "deepspeed",
                 "transformers", "diffusers", "huggingface_hub", "urllib3", "httpx", "filelock", "py.warnings")


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet_process() -> None:
    """Library loggers to ERROR (a filter too: DeepSpeed and torch reset their levels at import) and no
    Python warnings, in this process."""
    warnings.simplefilter("ignore")
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        if _errors_only not in logger.filters:
            logger.addFilter(_errors_only)
    for name in [n for n in logging.root.manager.loggerDict if n.startswith(("torch.", "ray."))]:
        logger = logging.getLogger(name)
        if logger.level and logger.level < logging.ERROR:  # set explicitly at import: NOTSET ones inherit
            logger.setLevel(logging.ERROR)


def quiet_train_worker() -> None:
    """Ray Train 2.60 logs every report at INFO through a logger named by its file path, under a root logger it
    configures at INFO: filter that logger itself (filters survive Train's dictConfig)."""
    from ray.train.v2._internal.execution import context

    logger = logging.getLogger(context.__file__)
    if _warnings_and_up not in logger.filters:
        logger.addFilter(_warnings_and_up)


def _warnings_and_up(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def enable(verbose: bool) -> None:
    """Set the environment (before Ray starts, so a local Ray's workers inherit it) and quiet this process."""
    if verbose:
        os.environ.pop(QUIET_FLAG, None)
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    quiet_process()


def is_quiet() -> bool:
    return os.environ.get(QUIET_FLAG) == "1"
