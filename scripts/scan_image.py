"""Scan a built image for known vulnerabilities and write the findings to a folder.

    python scripts/scan_image.py IMAGE [--out docs/scan]

Two scanners, each with the data this machine can reach:
- pip-audit on the Python packages in the image's venv (`pip freeze` inside the
  image), against PyPI's advisory data. When pip-audit cannot look a package
  up it skips it, and says so in pip-audit.json; the report counts those apart,
  so "no vulnerability found" never stands for "nothing was checked". For each
  package, `pip index versions` (pip's own client, the configured index) tells
  whether its pin is the newest release: a fixed advisory is always fixed in a
  release newer than the affected one, so a newest-release pin cannot be
  missing a published fix.
- Debian's security suite: inside the image, as root, `apt-get update` and
  `apt list --upgradable`: every package a published security (or stable)
  update has not yet reached.

Container storage and flags come from .ci/container-base/env.sh, as for the
tests. Writes OUT/python-packages.txt, pip-audit.json, pypi-newest.json,
debian-packages.txt, debian-upgradable.txt and summary.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV_SH = ROOT / ".ci" / "container-base" / "env.sh"
OUR_PACKAGES = {"torchserve-llm"}


def container_env() -> dict[str, str]:
    out = subprocess.run(
        ["bash", "-c", f"source {shlex.quote(str(ENV_SH))} && env -0"], check=True, capture_output=True, cwd=ROOT
    ).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def in_image(env: dict[str, str], image: str, *command: str, root: bool = False, network: str = "none") -> str:
    """stdout of COMMAND in a throwaway container of IMAGE (through its entrypoint)."""
    name = f"scan-{time.time_ns()}"
    args = ["podman", "run", "--rm", "--name", name, *shlex.split(env["PODMAN_RUN_OPTS"]), "--network", network]
    args += ["--user", "0"] if root else []
    return subprocess.run([*args, image, *command], env=env, check=True, capture_output=True, text=True).stdout


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def newest_release(name: str) -> str | None:
    result = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name], capture_output=True, text=True, check=False)
    match = re.search(r"^\S+ \(([^)]+)\)", result.stdout, re.MULTILINE)
    return match.group(1) if match else None


def summary(image: str, audit: dict, newest: dict[str, dict[str, str | None]], upgradable: list[str]) -> str:
    deps = audit["dependencies"]
    audited = [dep for dep in deps if "skip_reason" not in dep]
    skipped = [dep for dep in deps if "skip_reason" in dep]
    vulnerable = [dep for dep in audited if dep.get("vulns")]
    behind = {name: pins for name, pins in newest.items() if pins["newest"] and pins["newest"] != pins["pinned"]}
    unknown = sorted(name for name, pins in newest.items() if not pins["newest"])
    lines = [
        f"# Scan of `{image}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        'What each line can and cannot show: docs/docker.md, "Inside the image, and what a scan finds".',
        "",
        f"Python packages in /opt/venv: {len(deps)}.",
        f"- pip-audit: {len(audited)} audited, {len(vulnerable)} with known vulnerabilities, {len(skipped)} skipped.",
    ]
    lines += [f"  - {dep['name']} {dep['version']}: {', '.join(v['id'] for v in dep['vulns'])}" for dep in vulnerable]
    if skipped:
        reasons = sorted({re.sub(r": .*", "", dep["skip_reason"]) for dep in skipped})
        lines.append(f"  - skipped because: {'; '.join(reasons)}")
    lines.append(
        f"- Pinned at the newest release: {len(newest) - len(behind) - len(unknown)}; behind it: {len(behind)}"
        + (f"; not found on the index: {', '.join(unknown)}" if unknown else "")
    )
    lines += [f"  - {name} {pins['pinned']} (newest {pins['newest']})" for name, pins in sorted(behind.items())]
    lines += ["", f"Debian packages with a newer build in bookworm, bookworm-updates or bookworm-security: {len(upgradable)}."]
    lines += [f"- {line}" for line in upgradable]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "scan")
    args = parser.parse_args(argv)
    env = container_env()
    args.out.mkdir(parents=True, exist_ok=True)

    frozen = in_image(env, args.image, "pip", "freeze", "--all")
    pins = [line for line in frozen.splitlines() if "==" in line and canonical(line.split("==")[0]) not in OUR_PACKAGES]
    requirements = args.out / "python-packages.txt"
    requirements.write_text("\n".join(pins) + "\n")
    audit_file = args.out / "pip-audit.json"
    subprocess.run(
        [
            str(Path(sys.executable).parent / "pip-audit"),
            "--no-deps",
            "--disable-pip",
            "--progress-spinner",
            "off",
            "-r",
            str(requirements),
            "-f",
            "json",
            "-o",
            str(audit_file),
        ],
        check=False,
    )
    audit = json.loads(audit_file.read_text())
    newest = {}
    for pin in pins:
        name, version = pin.split("==", 1)
        newest[canonical(name)] = {"pinned": version, "newest": newest_release(name)}
    (args.out / "pypi-newest.json").write_text(json.dumps(newest, indent=1, sort_keys=True) + "\n")

    (args.out / "debian-packages.txt").write_text(in_image(env, args.image, "dpkg-query", "-W", "-f", "${Package} ${Version}\\n"))
    listed = in_image(
        env, args.image, "sh", "-c", "apt-get update -qq && apt list --upgradable 2>/dev/null", root=True, network="host"
    )
    upgradable = [line for line in listed.splitlines() if "upgradable from" in line]
    (args.out / "debian-upgradable.txt").write_text("".join(f"{line}\n" for line in upgradable))
    (args.out / "summary.md").write_text(summary(args.image, audit, newest, upgradable))
    return 0


if __name__ == "__main__":
    sys.exit(main())
