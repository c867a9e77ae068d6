"""``gradcam-service ray``'s options: checked, with the settings, before any Ray starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.cli import main


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("GRADCAM_", "RAY_ADDRESS")):
            monkeypatch.delenv(name)


def test_min_replicas_without_max_is_a_configuration_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["ray", "--min-replicas", "2"]) == 2
    assert "GRADCAM_RAY_MAX_REPLICAS" in capsys.readouterr().err


def test_a_fixed_count_and_autoscaling_bounds_exclude_each_other(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["ray", "--replicas", "2", "--max-replicas", "4"])
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_local_ray_sizes_do_not_apply_to_a_cluster(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "ray://127.0.0.1:10001")
    assert main(["ray", "--num-cpus", "2"]) == 2
    assert "local Ray" in capsys.readouterr().err


def test_without_ray_the_command_says_how_to_install_it() -> None:
    """Without the ``ray`` extra: one log line naming it, exit status 2, no traceback."""
    program = (
        "import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
        "from service.cli import main\n"
        "sys.exit(main(['ray']))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADCAM_", "RAY_"))}
    done = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'gradcam-service[ray]'" in done.stderr
    assert "Traceback" not in done.stderr
