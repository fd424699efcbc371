"""Settings are read from the environment in one place and documented in one file."""

import re
import subprocess
import sys

from deploy.gateway.server import GatewayConfig
from tests.helpers import REPO, variables_in_example, variables_read_by_start_scripts


def variables_read_by_settings() -> set[str]:
    source = (REPO / "shop" / "settings.py").read_text()
    return set(re.findall(r"\benv(?:_bool|_int|_float)?\(\s*\"([A-Z_]+)\"", source))


def test_every_variable_the_settings_read_is_in_the_example_env_file_and_vice_versa():
    read = variables_read_by_settings()

    assert len(read) > 20  # the regex found the reads
    read_by_libraries = {"PROMETHEUS_MULTIPROC_DIR"}  # prometheus-client reads it itself
    read_by_scripts = variables_read_by_start_scripts()  # deploy/bin/: LISTEN_HOST, ...
    # docker-compose.yml's own `${...}`: the Grafana password, and values it passes on
    read_by_compose = set(re.findall(r"\$\{([A-Z_]+)", (REPO / "docker-compose.yml").read_text()))
    expected = read | set(GatewayConfig.ENV_VARS.values()) | read_by_libraries | read_by_scripts
    expected |= read_by_compose
    assert expected == variables_in_example()


def test_production_mode_refuses_to_start_without_a_secret_key():
    result = subprocess.run(
        [sys.executable, "-c", "import shop.settings"],
        cwd=REPO,
        env={"SHOP_ENV": "production", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode != 0
    assert "SECRET_KEY must be set when SHOP_ENV=production" in result.stderr


def test_every_cited_fact_is_written_down_in_the_repository():
    notes = (REPO / "jobs" / "NOTES.md").read_text()
    sections = set(re.findall(r"^## (§\d+)", notes, flags=re.MULTILINE))
    sources = [
        path
        for path in [*REPO.glob("*.md"), *REPO.glob("[a-z]*/**/*.py"), *REPO.glob("deploy/**/*")]
        if path.is_file() and not {".venv", "var"} & set(path.relative_to(REPO).parts)
    ]

    cited = {
        (path.relative_to(REPO).as_posix(), cite)
        for path in sources
        for cite in re.findall(r"\[(§\d*)\]", path.read_text(errors="replace"))
    }
    outside = [p for p in sources if "../" + "shared" in p.read_text(errors="replace")]

    assert cited  # the settings do cite
    assert {(path, cite) for path, cite in cited if cite not in sections} == set()
    assert outside == []


def test_the_lifecycle_story_names_every_signal_receiver_that_acts_on_a_task():
    import jobs.base

    story = jobs.base.__doc__ or ""
    receivers = [
        (signal, path.relative_to(REPO).with_suffix("").as_posix().replace("/", "."))
        for path in [*REPO.glob("jobs/*.py"), *REPO.glob("shop/**/*.py")]
        for signal in re.findall(r"^@(\w+)\.connect", path.read_text(), flags=re.MULTILINE)
    ]

    assert len(receivers) > 10  # the regex found them
    missing = [(s, m) for s, m in receivers if s not in story or m not in story]
    assert missing == []


def test_the_shop_calls_the_local_gateway_on_the_port_make_run_starts_it_on():
    def url(**env: str) -> str:
        result = subprocess.run(
            [sys.executable, "-c", "import shop.settings as s; print(s.PAYMENT_GATEWAY_URL)"],
            cwd=REPO,
            env={"PATH": "/usr/bin:/bin", **env},
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout.strip()

    assert url() == "http://127.0.0.1:8100"
    assert url(GATEWAY_PORT="8711") == "http://127.0.0.1:8711"
    assert url(GATEWAY_PORT="8711", PAYMENT_GATEWAY_URL="https://pay.example") == (
        "https://pay.example"
    )
