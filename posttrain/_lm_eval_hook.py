"""Makes ``lm_eval --model posttrain`` work: registers our adapter when lm-eval loads its models.

lm-eval 0.4.13 has no plugin entry point for models: ``lm_eval.models`` fills
``lm_eval.api.registry.model_registry`` from a fixed dict, and the ``lm_eval`` console script
resolves ``--model`` against it. So the package build (`posttrain._build`) installs
``posttrain-lm-eval.pth`` next to the package in site-packages; Python runs its one line,
``import posttrain._lm_eval_hook as h; h.install()``, at start-up. `install` only puts a
one-shot finder at the front of ``sys.meta_path``; it imports nothing else. The finder answers
for no module but ``lm_eval.models``: when a process imports it, the real module runs first,
then `register` adds the lazy placeholder ``posttrain`` -> ``posttrain.eval.harness:PosttrainLM``
(a ``module:attr`` string that lm-eval imports on first use), and the finder removes itself.
A process that never imports lm-eval pays for importing ``posttrain`` (its version string) and
this module (``sys`` only; ~0.2 ms) and one string comparison per first import of a module.
"""

from __future__ import annotations

import sys

TRIGGER = "lm_eval.models"
"""The module whose import registers lm-eval's built-in models (and then ours)."""
MODEL_NAME = "posttrain"
PLACEHOLDER = "posttrain.eval.harness:PosttrainLM"


def register() -> bool:
    """Add ``posttrain`` to lm-eval's model registry as a lazy placeholder (a no-op when it is
    there); True when it is registered. Never raises: a failure warns, so lm-eval's own models
    keep working."""
    try:
        from lm_eval.api.registry import model_registry

        if MODEL_NAME not in model_registry:
            try:
                model_registry.register(MODEL_NAME, target=PLACEHOLDER)  # lm-eval 0.4.10-0.4.13
            except TypeError:
                model_registry.register(MODEL_NAME, lazy=PLACEHOLDER)  # the older Registry API
        return True
    except Exception as exc:  # noqa: BLE001 -- a broken hook must not break lm_eval
        import warnings

        warnings.warn(f"posttrain: could not register the lm-eval model 'posttrain': {exc!r}", stacklevel=2)
        return False


class LmEvalFinder:
    """A one-shot ``sys.meta_path`` finder: finds ``lm_eval.models`` with the other finders and
    wraps its loader's ``exec_module`` so that `register` runs right after the module."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        if name != TRIGGER:
            return None
        uninstall()
        from importlib.util import find_spec

        spec = find_spec(name)  # the parent package is imported already; this finder is gone
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: object) -> None:
            run(module)
            register()

        loader.exec_module = exec_module  # this spec's own loader instance
        return spec


def install() -> None:
    """Register now if lm-eval's models are loaded already, else put the finder first (once)."""
    if TRIGGER in sys.modules:
        register()
    elif not any(isinstance(f, LmEvalFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, LmEvalFinder())


def uninstall() -> None:
    """Remove the finder (a no-op when it is not installed)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, LmEvalFinder)]
