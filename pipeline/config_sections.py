"""Developer tool: write the step sections of ``default_config.yaml`` from the parameter classes.

    python -m pipeline.config_sections          # rewrite the file's step sections in place

Each section is the class's summary, then every parameter with its doc and default
(`pipeline.parameters.StepParams.yaml_section`), so the file documents exactly what the code
accepts; ``tests/test_layout.py`` checks that it does.  Sections that are not steps' are kept.
"""

from __future__ import annotations

import re

from pipeline.step import step_classes
from util.config import default_config_path

__all__ = ["write_step_sections"]


def write_step_sections() -> list[str]:
    """Rewrite every package step's section of ``default_config.yaml``; return their names."""
    path = default_config_path().resolve()
    text = path.read_text()
    steps = {p: cls for p, cls in step_classes().items() if cls.__module__.startswith("pipeline.")}
    # top-level blocks: a line "name:" and what follows it up to the next top-level key
    blocks = re.split(r"(?m)^(?=[A-Za-z_][A-Za-z0-9_]*:)", text)
    out = []
    for block in blocks:
        name = block.split(":", 1)[0] if re.match(r"[A-Za-z_]", block) else None
        if name in steps:
            out.append(steps[name].Params.yaml_section() + "\n")
        else:
            out.append(block)
    path.write_text("".join(out).rstrip("\n") + "\n")
    return sorted(steps)


if __name__ == "__main__":
    print("rewrote sections:", ", ".join(write_step_sections()))
