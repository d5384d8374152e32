"""The one thing pyproject.toml cannot say: ship `peft_lora_mixer_autoregister.pth` at the root of site-packages, in
regular and editable installs alike (see `src/peft_lora_mixer_autoregister.py`). Everything else is in pyproject."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "peft_lora_mixer_autoregister.pth"


class BuildPyWithPth(build_py):
    """`build_py`, plus the .pth file at the wheel's root."""

    def run(self) -> None:
        super().run()
        # an editable wheel holds no built files, only what the install step writes into the wheel itself
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(os.path.join("src", PTH), os.path.join(root, PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
