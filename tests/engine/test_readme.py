"""The README stays true: its set-up commands are what CI runs, its recipe reference matches the schema."""

import re
from pathlib import Path

from lowmem.recipe import reference_markdown

ROOT = Path(__file__).parents[2]


def test_readme_recipe_reference_matches_the_schema():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- recipe-reference:start -->\n(.*?)<!-- recipe-reference:end -->", readme, re.S)
    assert block, "README lost its recipe-reference markers"
    assert block.group(1).strip() == reference_markdown().strip(), "run: python -m lowmem.recipe, paste into README"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).splitlines()
    test_command = commands[1].split("#")[0].strip()
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()
    assert commands[0].split("#")[0].strip() == "bash install.sh && .venv/bin/lowmem-train recipes/default.yaml"


def test_readme_names_the_extras_install_sh_installs():
    extras = re.search(r'EXTRAS="([\w,]+)"', (ROOT / "install.sh").read_text()).group(1).split(",")
    said = re.search(r"lowmem (?:in editable mode )?with its (.*?) extras", (ROOT / "README.md").read_text()).group(1)
    assert sorted(re.findall(r"`(\w+)`", said)) == sorted(extras), said


def test_readme_accelerate_line_passes_what_accelerate_warns_about():
    """accelerate launch warns "values were not passed ... defaults used" unless these are given (and
    OMP_NUM_THREADS, on a CPU), as the long form in examples/accelerate_ddp.md does."""
    readme = (ROOT / "README.md").read_text().replace("\\\n", " ")
    lines = [x for x in readme.splitlines() if " accelerate launch " in x and x.startswith("OMP_")]
    assert lines
    for line in lines:
        for flag in ("--num_processes", "--num_machines", "--mixed_precision", "--dynamo_backend"):
            assert flag in line, (flag, line)
