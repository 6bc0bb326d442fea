"""The package installs as a wheel with its recipes and card templates; README and CI agree."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (whl,) = out.glob("mochi_hub-*.whl")
    return whl


def test_wheel_ships_recipes_templates_and_console_script(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for recipe in (ROOT / "recipes").glob("*.yaml"):
        assert f"mochi_hub/recipes/{recipe.name}" in names
    for template in (ROOT / "model_cards").glob("*.j2"):
        assert f"mochi_hub/model_cards/{template.name}" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "mochi-hub = mochi_hub.cli:main" in text
    assert not any(n.startswith("tests/") for n in names)


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    marker = re.search(r"<!-- test-command: (.*) -->", readme).group(1)
    assert f"&& {marker}\n" in readme  # the command shown to newcomers
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci and 'eval "$TEST_CMD"' in ci
    assert 'pip install --quiet ".[test]"' in ci and "python3 -m venv" in ci


def test_readme_quickstart_command_names_a_real_recipe():
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"mochi-hub pretrain (recipes/\S+\.yaml)", readme)
    assert match and (ROOT / match.group(1)).is_file()


def test_export_renders_the_card_from_the_installed_wheel(wheel, tmp_path):
    """The templates and recipes resolve inside an installed (non-editable) package."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = f"""
import sys
sys.path.insert(0, {str(site)!r})
import timm, mochi_hub
from huggingface_hub import ModelCard
from mochi_hub.config import load_config
from mochi_hub.export import write_hub_folder
assert mochi_hub.__file__.startswith({str(site)!r}), mochi_hub.__file__
assert load_config("quickstart").name == "quickstart"
model = timm.create_model("resnet18", num_classes=0, channels=(8, 16, 16, 16))
out = write_hub_folder(
    model, {str(tmp_path / "out")!r}, architecture="resnet18", metadata={{}},
    data_config=dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0),
    card=dict(method="MoCo-v2", mixing=dict(num_hard=4, num_synthetic=2,
              num_synthetic_query=1, start_epoch=0)),
)
card = ModelCard.load(out / "README.md")
assert card.data.library_name == "timm" and "mochi" in card.data.tags
print(card.text.count("(4, 2, 1)"))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "1"
