"""The Debian package, the default config it ships, and the offline bundle.

Fast tests check that the packaging agrees with the code (defaults, commands,
dependencies) and that install.sh refuses a tampered bundle. The slow ones
build the .deb and the bundle for real and look inside; installing them on a
booted system is tests/e2e.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from hasentinel import __version__, cli, config

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"
DEFAULT_CONFIG = REPO / "config" / "hasentinel.yaml"
CONTROL = PACKAGING / "debian" / "control"
MANPAGE = PACKAGING / "hasentinel.8"
INSTALL_SH = PACKAGING / "bundle" / "install.sh"

# pyproject's Python requirement -> the Debian package that provides it.
DEBIAN_NAMES = {
    "aiohttp": "python3-aiohttp",
    "pyyaml": "python3-yaml",
    "jinja2": "python3-jinja2",
    "structlog": "python3-structlog",
    "sdnotify": "python3-sdnotify",
    "prometheus-client": "python3-prometheus-client",
    "cryptography": "python3-cryptography",
}
# A module the daemon imports -> the Debian package that provides it.
MODULE_PACKAGES = {
    "aiohttp": "python3-aiohttp",
    "cryptography": "python3-cryptography",
    "jinja2": "python3-jinja2",
    "prometheus_client": "python3-prometheus-client",
    "sdnotify": "python3-sdnotify",
    "structlog": "python3-structlog",
    "systemd": "python3-systemd",
    "yaml": "python3-yaml",
}
# Settings fields whose YAML key differs from the field name.
YAML_KEYS = {"status_listen": "status.listen", "log_level": "log.level", "log_format": "log.format"}


def run(
    cmd: list[str | os.PathLike[str]], timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, (
        f"{cmd} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def control_field(package: str | None, field: str) -> str:
    """A field of debian/control's source stanza (package None) or of a binary package."""
    for stanza in CONTROL.read_text().split("\n\n"):
        lines = stanza.strip().splitlines()
        if not lines:
            continue
        is_source = lines[0].startswith("Source:")
        if (package is None and is_source) or lines[0] == f"Package: {package}":
            text = "\n".join(lines)
            match = re.search(rf"^{field}:(.*(?:\n .*)*)", text, re.MULTILINE)
            assert match, f"no {field} in the {package or 'source'} stanza"
            return match.group(1)
    raise AssertionError(f"no stanza for {package}")


def depends_names(field: str) -> set[str]:
    names = set()
    for raw in field.replace("\n", " ").split(","):
        item = raw.strip()
        if item and not item.startswith("$"):
            names.add(re.split(r"[\s(]", item, maxsplit=1)[0])
    return names


def settings_keys(cls: Any, prefix: str = "") -> set[str]:
    """Every dotted YAML key of the settings dataclasses (nested *Settings are sections)."""
    keys = set()
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        name = YAML_KEYS.get(f.name, f"{prefix}{f.name}")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default) and type(default).__name__.endswith("Settings"):
            keys |= settings_keys(type(default), f"{name}.")
        else:
            keys.add(name)
    return keys


def yaml_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, val in data.items():
        if isinstance(val, dict):
            keys |= yaml_keys(val, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


# -- the default configuration ---------------------------------------------------


def test_default_config_is_the_code_defaults() -> None:
    """The shipped hasentinel.yaml means exactly what an empty file means, with no master."""
    shipped = config.parse_settings(yaml.safe_load(DEFAULT_CONFIG.read_text()), check_files=False)
    assert shipped == config.parse_settings({}, check_files=False)
    assert shipped.masters == ()


def test_default_config_lists_every_key() -> None:
    """Every setting the code knows appears in the shipped file, so the file documents them all."""
    shipped = yaml_keys(yaml.safe_load(DEFAULT_CONFIG.read_text()))
    assert shipped == settings_keys(config.Settings)


def test_default_config_comments_every_key() -> None:
    """Each key has a comment just above it (two related keys may share one)."""
    lines = DEFAULT_CONFIG.read_text().splitlines()
    key_re = re.compile(r"^(\s*)[a-z_]+:")
    uncommented = []
    for i, line in enumerate(lines):
        match = key_re.match(line)
        if not match:
            continue
        above = i - 1
        if above >= 0 and key_re.match(lines[above]) and lines[above].startswith(match.group(1)):
            above -= 1  # one sibling key may share the comment
        if above < 0 or not lines[above].strip().startswith("#"):
            uncommented.append(line.strip())
    assert not uncommented


# -- packaging metadata ----------------------------------------------------------


def test_package_depends_on_every_runtime_requirement() -> None:
    """debian/control names a Debian package for each of pyproject's dependencies, and HAProxy."""
    pyproject = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)\]", pyproject, re.MULTILINE | re.DOTALL)
    assert block
    requirements = {
        re.split(r"[<>=!~ ;\[]", r.strip().strip('",'), maxsplit=1)[0].lower()
        for r in block.group(1).split("\n")
        if r.strip().startswith('"')
    }
    depends = depends_names(control_field("hasentinel", "Depends"))
    assert {DEBIAN_NAMES[r] for r in requirements} <= depends
    assert {"haproxy", "python3", "procps"} <= depends


def test_package_depends_on_everything_the_code_imports() -> None:
    """Each third-party module imported anywhere in hasentinel/ has its Debian package in Depends
    (a missing one only shows on a clean node, as a crash loop)."""
    imported = set()
    for source in (REPO / "hasentinel").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"hasentinel", "__future__"}
    unknown = third_party - set(MODULE_PACKAGES)
    assert not unknown, (
        f"add the Debian packages of {sorted(unknown)} to debian/control and MODULE_PACKAGES"
    )
    depends = depends_names(control_field("hasentinel", "Depends"))
    assert {MODULE_PACKAGES[m] for m in third_party} <= depends


def test_changelog_is_not_ahead_of_the_code() -> None:
    """build-deb adds a changelog entry when __version__ is ahead, and refuses when it is behind."""
    top = (PACKAGING / "debian" / "changelog").read_text().splitlines()[0]
    match = re.match(r"hasentinel \(([^)]+)\)", top)
    assert match
    if shutil.which("dpkg") is None:
        pytest.skip("dpkg is missing")
    subprocess.run(["dpkg", "--compare-versions", __version__, "ge", match.group(1)], check=True)


def test_manpage_documents_every_command() -> None:
    """hasentinel.8 has a section for every subcommand the CLI offers."""
    parser = cli.build_parser()
    commands = {
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    }
    page = MANPAGE.read_text().replace("\\-", "-")
    documented = set(re.findall(r'^(?:\.(?:B|BR|BI) "?|\\fB)([a-z][a-z-]*)', page, re.MULTILINE))
    assert commands <= documented


# -- install.sh, on a bundle of fake packages ----------------------------------------


@pytest.fixture
def fake_bundle(tmp_path: Path) -> Path:
    bundle = tmp_path / "bundle"
    (bundle / "debs").mkdir(parents=True)
    text = INSTALL_SH.read_text().replace("@VERSION@", "0.0.0").replace("@ARCH@", _arch())
    (bundle / "install.sh").write_text(text)
    (bundle / "install.sh").chmod(0o755)
    (bundle / "README").write_text("test\n")
    (bundle / "debs" / "hasentinel_0.0.0_all.deb").write_bytes(b"not really a package")
    subprocess.run(
        ["sh", "-c", "sha256sum README install.sh debs/*.deb > SHA256SUMS"], cwd=bundle, check=True
    )
    return bundle


def _arch() -> str:
    if shutil.which("dpkg") is None:
        pytest.skip("dpkg is missing")
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


def _install_sh(bundle: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(bundle / "install.sh"), "--verify-only", "--force", *args],
        capture_output=True, text=True, timeout=60, check=False, cwd="/",
    )  # fmt: skip


def test_install_sh_accepts_an_intact_bundle(fake_bundle: Path) -> None:
    """--verify-only passes when every file matches SHA256SUMS."""
    result = _install_sh(fake_bundle)
    assert result.returncode == 0, result.stderr
    assert "checksums OK" in result.stdout


def test_install_sh_refuses_a_modified_file(fake_bundle: Path) -> None:
    """One changed byte in a .deb stops the installation before apt runs."""
    with open(fake_bundle / "debs" / "hasentinel_0.0.0_all.deb", "ab") as deb:
        deb.write(b"!")
    result = _install_sh(fake_bundle)
    assert result.returncode == 1
    assert "checksum mismatch" in result.stderr


def test_install_sh_refuses_an_unlisted_package(fake_bundle: Path) -> None:
    """A .deb slipped into debs/ without a checksum is refused, not installed."""
    (fake_bundle / "debs" / "extra_1.0_all.deb").write_bytes(b"extra")
    result = _install_sh(fake_bundle)
    assert result.returncode == 1
    assert "not listed in SHA256SUMS" in result.stderr


# -- building for real ---------------------------------------------------------


@pytest.fixture(scope="module")
def built_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0 and shutil.which("dpkg-buildpackage") is None:
        pytest.skip(
            "needs root to install the build dependencies (or run packaging/build-deb once as root)"
        )
    junk = ("debian", ".pybuild", "build", "hasentinel.egg-info")
    before = {name for name in junk if (REPO / name).exists()}
    out = tmp_path_factory.mktemp("dist")
    result = run([PACKAGING / "build-deb", "--out", out])
    after = {name for name in junk if (REPO / name).exists()}
    assert after == before, "build-deb left build output in the checkout"
    deb = Path(result.stdout.strip().splitlines()[-1])
    assert deb == out / f"hasentinel_{__version__}_all.deb"
    return deb


@pytest.mark.slow
def test_deb_installs_what_an_operator_needs(built_deb: Path) -> None:
    """The .deb carries the command, both units, the conffile, the state dir and the man page;
    build-deb already failed the build on any lintian warning that is not overridden."""
    listing = run(["dpkg-deb", "--contents", built_deb]).stdout
    paths = {line.split()[-1].removeprefix(".") for line in listing.splitlines()}
    assert {
        "/usr/bin/hasentinel",
        "/lib/systemd/system/hasentinel.service",
        "/lib/systemd/system/hasentinel-haproxy.service",
        "/etc/hasentinel/hasentinel.yaml",
        "/var/lib/hasentinel/",
        "/usr/share/man/man8/hasentinel.8.gz",
        "/usr/lib/python3/dist-packages/hasentinel/templates/haproxy.cfg.j2",
    } <= paths
    control = Path(run(["mktemp", "-d"]).stdout.strip())
    try:
        run(["dpkg-deb", "--control", built_deb, control])
        assert (control / "conffiles").read_text().split() == ["/etc/hasentinel/hasentinel.yaml"]
        postinst = (control / "postinst").read_text()
        assert "deb-systemd-helper enable 'hasentinel.service'" in postinst
        assert "deb-systemd-helper enable 'hasentinel-haproxy.service'" in postinst
        # An upgrade restarts the sentinel, never the data plane.
        prerm = (control / "prerm").read_text()
        assert re.search(
            r"\$1\" = remove .*\n\s*deb-systemd-invoke stop 'hasentinel-haproxy.service'", prerm
        )
        assert "deb-systemd-invoke $_dh_action 'hasentinel-haproxy.service'" not in postinst
        postrm = (control / "postrm").read_text()
        assert "rm -rf /etc/hasentinel /var/lib/hasentinel" in postrm
        assert "/etc/haproxy" not in postrm.replace("never touches /etc/haproxy/", "")
    finally:
        shutil.rmtree(control)
    depends = depends_names(run(["dpkg-deb", "--field", built_deb, "Depends"]).stdout)
    assert {"haproxy", "python3-aiohttp", "python3-sdnotify", "procps"} <= depends


@pytest.mark.slow
@pytest.mark.root
def test_bundle_holds_the_package_its_dependencies_and_sums(
    built_deb: Path, tmp_path: Path
) -> None:
    """The offline bundle: one top directory with install.sh, SHA256SUMS matching every .deb,
    and the dependencies a minimal Debian 12 lacks."""
    if os.geteuid() != 0:
        pytest.skip(
            "needs root (debootstrap of the minimal root the dependencies are resolved against)"
        )
    cache = Path(os.environ.get("HASENTINEL_TEST_CACHE", "/var/cache/hasentinel-tests"))
    result = run(
        [PACKAGING / "build-bundle", "--deb", built_deb, "--out", tmp_path, "--cache", cache]
    )
    tarball = Path(result.stdout.strip().splitlines()[-1])
    top = f"hasentinel-offline-{__version__}-debian12-{_arch()}"
    assert tarball == tmp_path / f"{top}.tar.gz"
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
        assert {n.split("/")[0] for n in names} == {top}
        sums = tar.extractfile(f"{top}/SHA256SUMS").read().decode()  # type: ignore[union-attr]
    listed = {line.split()[1] for line in sums.splitlines()}
    debs = {n.removeprefix(f"{top}/") for n in names if n.endswith(".deb")}
    assert debs <= listed and {"install.sh", "README"} <= listed
    packages = {Path(d).name.split("_")[0] for d in debs}
    assert {
        "hasentinel",
        "haproxy",
        "python3-aiohttp",
        "python3-structlog",
        "python3-yaml",
    } <= packages
    # Essential packages are on every Debian system: none of them is bundled.
    assert not packages & {"libc6", "dpkg", "apt", "coreutils", "bash"}
    assert (tmp_path / f"{top}.tar.gz.sha256").read_text().split()[0]
