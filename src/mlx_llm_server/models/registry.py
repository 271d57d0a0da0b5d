"""Which Python module builds which architecture.

mlx-lm picks a module by the `model_type` in a model's config.json. This registry is consulted
first, so an architecture mlx-lm lacks (or a replacement for one it has) is served without
forking mlx-lm: a module that defines `ModelArgs` and `Model` the way mlx-lm's own do.
Every module in `mlx_llm_server.custom_models` registers itself under its file name.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from mlx_lm.utils import _get_classes as mlx_lm_model_classes

from .. import custom_models


class ModelRegistry:
    def __init__(self) -> None:
        self._modules: dict[str, ModuleType] = {}

    def register(self, model_type: str, module: ModuleType) -> None:
        """Serve `model_type` with `module`'s `Model` and `ModelArgs`."""
        for name in ("Model", "ModelArgs"):
            if not hasattr(module, name):
                raise TypeError(f"model module {module.__name__!r} defines no {name}")
        self._modules[model_type] = module

    def register_file(self, path: str | Path) -> str:
        """Registers a model file under its stem (`my_arch.py` serves `model_type: my_arch`)."""
        path = Path(path)
        spec = importlib.util.spec_from_file_location(f"mlx_llm_server_user_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot import a model module from {path}")
        module = importlib.util.module_from_spec(spec)
        # A module must be in sys.modules while it executes: dataclasses (ModelArgs) resolve
        # string annotations (`from __future__ import annotations`) through it.
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
            self.register(path.stem, module)
        except BaseException:
            sys.modules.pop(spec.name, None)
            raise
        return path.stem

    def unregister(self, model_type: str) -> None:
        self._modules.pop(model_type, None)

    def model_types(self) -> list[str]:
        return sorted(self._modules)

    def get_model_classes(self, config: dict[str, Any]) -> tuple[type, type]:
        """The `get_model_classes` hook of `mlx_lm.utils.load_model`."""
        module = self._modules.get(config.get("model_type", ""))
        if module is not None:
            return module.Model, module.ModelArgs
        return mlx_lm_model_classes(config)


def _discover_builtin(registry: ModelRegistry) -> None:
    for info in pkgutil.iter_modules(custom_models.__path__):
        module = importlib.import_module(f"{custom_models.__name__}.{info.name}")
        registry.register(info.name, module)


model_registry = ModelRegistry()
_discover_builtin(model_registry)
