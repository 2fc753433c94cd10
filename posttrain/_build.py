"""Package build step (``[tool.setuptools.cmdclass]`` in pyproject.toml; only setuptools imports
it): installs ``posttrain-lm-eval.pth`` beside the ``posttrain`` package, so that ``lm_eval
--model posttrain`` finds our adapter (`posttrain._lm_eval_hook` says how, and why lm-eval 0.4.13 needs it).

A wheel gets the file at its root (site-packages once installed); an editable install
(``pip install -e .``) writes it into the editable wheel, so both carry it, and ``pip uninstall``
removes it with the rest of the package's files.
"""

from __future__ import annotations

import os

from setuptools.command.build_py import build_py

PTH_NAME = "posttrain-lm-eval.pth"
PTH_LINE = "import posttrain._lm_eval_hook as h; h.install()\n"
"""Python runs a .pth line that starts with ``import`` at start-up (the ``site`` module)."""


class BuildPyWithPth(build_py):
    """``build_py``, then the .pth file: into ``build_lib`` (a wheel's root), or for an editable
    install into the editable wheel's root (``install_lib``), which setuptools packs as it is."""

    def run(self) -> None:
        super().run()
        folder = self._pth_folder()
        self.mkpath(folder)
        with open(os.path.join(folder, PTH_NAME), "w", encoding="utf-8") as f:
            f.write(PTH_LINE)

    def _pth_folder(self) -> str:
        if getattr(self, "editable_mode", False):
            return self.get_finalized_command("install").install_lib
        return self.build_lib

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs
