"""The built wheel, installed alone in a new virtual environment, runs the broker and the demo.

A source checkout hides a missing piece of package data (the shipped policies, the SQL adapter
examples) or an import of a module outside the package: here nothing of the checkout is on
``sys.path``. The wheel is built from a copy of the tracked files, so the checkout stays clean.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest

from certbroker.adapters.demo import synthetic

ROOT = Path(__file__).resolve().parents[1]
CASE = "GZ20261121-000901"


def _tracked_copy(target: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            dest = target / os.fsdecode(name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest)
    return target


def _clean_env(home: Path) -> dict[str, str]:
    """No CERTBROKER_* settings, no PYTHONPATH: only what the wheel itself carries."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CERTBROKER_", "PYTHON"))}
    env["HOME"] = str(home)
    return env


# Builds the wheel, installs it with its dependencies into a new venv, plays the whole demo and
# serves: two minutes or more on a busy 2-core machine, past the suite's default 120 s.
@pytest.mark.timeout(600)
def test_wheel_alone_serves_and_plays_the_demo(tmp_path: Path) -> None:
    source = _tracked_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("certbroker-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "certbroker/policies/catalogue.yaml" in names
    assert "certbroker/adapters/sql/examples/marriage.toml" in names
    for console_file in (
        "templates/overview.html",
        "static/console.js",
        "static/console.css",
        "static/vendor/echarts-5.5.1.min.js",
        "static/vendor/htmx-1.9.12.min.js",
    ):
        assert f"certbroker/console/{console_file}" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "broker/", "adapters/"))]

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    run_dir = tmp_path / "elsewhere"  # not the checkout: nothing of the source is importable
    run_dir.mkdir()
    env = _clean_env(tmp_path)
    subprocess.run(
        [str(bin_dir / "pip"), "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        cwd=run_dir,
        env=env,
        check=True,
        capture_output=True,
    )
    certbroker = str(bin_dir / "certbroker")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [certbroker, *args],
            cwd=run_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    demo = cli("demo")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "certbroker audit verify: ok" in demo.stdout
    assert "Demo complete" in demo.stdout

    state = run_dir / "state"
    serve = subprocess.Popen(
        [certbroker, "serve", "--port", "0", "--metrics-port", "0", "--state-dir", str(state)],
        cwd=run_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert serve.stdout is not None
        port = 0
        for line in serve.stdout:
            if line.startswith("READY "):
                port = int(line.split()[1].split("=")[1])
                break
        assert port, serve.stderr.read() if serve.stderr else "no READY line"
        issued = cli(
            *("token", "issue", "--state-dir", str(state), "--sub", "clerk-wheel"),
            *("--roles", "window_clerk", "--office", "gz-haizhu-24h-01"),
        )
        assert issued.returncode == 0, issued.stderr
        # The embedded default wrote its synthetic datasets; the source's reader picks a person.
        person, _spouse = synthetic.sample_couple(state / "datasets")
        answer = cli(
            *("lookup", "--target", f"127.0.0.1:{port}", "--token", issued.stdout.strip()),
            *("--record-type", "marriage", "--subject", person, "--matter", "BDC-ZY-001"),
            *("--case", CASE, "--consent", "id_card_read", "--consent-ref", "CR-1", "--json"),
        )
        assert answer.returncode == 0, answer.stdout + answer.stderr
        # A record, authorized by the packaged policies and audited in the installed broker.
        assert '"marital_status"' in answer.stdout
        verify = cli("audit", "verify", "--state-dir", str(state))
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert "1 entries" in verify.stdout or "1 entry" in verify.stdout, verify.stdout
        _console_serves_its_files(certbroker, state, port, run_dir, env)
    finally:
        serve.terminate()
        serve.wait(30)
        for stream in (serve.stdout, serve.stderr):
            if stream is not None:
                stream.close()


def _console_serves_its_files(
    certbroker: str, state: Path, port: int, run_dir: Path, env: dict[str, str]
) -> None:
    """``certbroker console`` from the wheel: its templates and vendored scripts are there."""
    console = subprocess.Popen(
        [certbroker, "console", "--port", "0", "--state-dir", str(state)],
        cwd=run_dir,
        env=env | {"CERTBROKER_CONSOLE_BROKER": f"127.0.0.1:{port}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert console.stdout is not None
        url = next(
            (
                line.split("=", 1)[1].strip()
                for line in console.stdout
                if line.startswith("READY url=")
            ),
            "",
        )
        assert url, "no READY line from certbroker console"
        with urllib.request.urlopen(url + "static/vendor/echarts-5.5.1.min.js") as script:
            assert script.status == 200
            assert len(script.read()) > 500_000
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        with browser.open(url + "signin") as page:  # -> the dev IdP's users page
            assert "审计员" in page.read().decode()
    finally:
        console.terminate()
        assert console.wait(30) == 0
        if console.stdout is not None:
            console.stdout.close()
