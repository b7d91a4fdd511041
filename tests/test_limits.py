"""vlm.limits: every bound a request is checked against, read once from the environment into
one object; importing vlm (or the app) reads none of them."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_app import pinned_env

from vlm.errors import ConfigError
from vlm.limits import Limits, current, parse_size

ROOT = Path(__file__).resolve().parents[1]


def test_from_env_reads_each_variable_over_its_default():
    environ = {"VLM_MAX_LABELS": "7", "VLM_MAX_FILE_SIZE": "2mb", "VLM_TEMP_MAX_AGE": "4.5",
               "VLM_TRAIN_MAX_STEPS": " 30 ", "VLM_MAX_NEW_TOKENS": ""}  # fmt: skip
    limits = Limits.from_env(environ)
    assert (limits.max_labels, limits.max_file_size, limits.temp_max_age) == (7, 2 << 20, 4.5)
    assert limits.train_max_steps == 30
    assert limits.max_new_tokens == Limits().max_new_tokens == 60  # empty: the default
    assert Limits.from_env({}) == Limits()


def test_a_bad_value_names_its_variable():
    with pytest.raises(ConfigError, match=r"VLM_MAX_LABELS='many' is not a valid setting"):
        Limits.from_env({"VLM_MAX_LABELS": "many"})
    with pytest.raises(ConfigError, match="VLM_UPLOAD_QUOTA"):
        Limits.from_env({"VLM_UPLOAD_QUOTA": "2 lots"})


def test_the_body_limit_follows_the_other_limits_unless_set():
    small = Limits(max_file_size=1 << 20, max_labels=10)
    assert small.max_body_size == small.largest_request_bytes() < Limits().max_body_size
    assert Limits.from_env({"VLM_MAX_BODY_SIZE": "3mb"}).max_body_size == 3 << 20
    # the default, documented in README: one 50 MB image inline plus the longest texts
    assert f"{Limits().max_body_size / 2**20:.1f} MB" == "71.3 MB"


def test_every_variable_readme_lists_is_a_limit_with_its_default():
    readme = (ROOT / "README.md").read_text()
    table = re.findall(r"^\| `(VLM_[A-Z_]+)`(?:, `(VLM_[A-Z_]+)`)? \| ([^|]+) \|", readme, re.M)
    variables = Limits.variables()
    assert len(table) >= 15
    for first, second, default in table:
        for name in filter(None, (first, second)):
            assert name in variables, name
        value = getattr(Limits(), variables[first])
        shown = default.split()[0].strip("`").replace(",", "")
        if not shown.isdigit():
            continue  # "50mb", "2gb" and the computed body size: checked above and below
        assert value == float(shown), (first, value, shown)
    assert Limits().max_file_size == parse_size("50mb")
    assert Limits().upload_quota == parse_size("2gb")


def test_importing_reads_no_limit_and_a_server_reads_them_once(tmp_path):
    """A bad VLM_* value no longer breaks `import app`: the limits are read when a server is
    set up (the flags parsed), where a bad one is one clear line."""
    script = (
        "import vlm, vlm.serve, vlm.training.jobs, app\n"
        "from vlm.limits import current\n"
        "assert current.cache_info().currsize == 0, 'read at import'\n"
        "try:\n"
        "    app.parse_settings([])\n"
        "except Exception as error:\n"
        "    print(type(error).__name__, error)\n"
    )
    env = pinned_env(tmp_path, VLM_MAX_PENDING="four", PYTHONPATH=str(ROOT))
    child = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.strip() == "ConfigError VLM_MAX_PENDING='four' is not a valid setting"


def test_current_is_read_once():
    assert current() is current()
