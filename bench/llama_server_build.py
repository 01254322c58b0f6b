"""Build llama.cpp's `llama-server` from the source vendored in llama-cpp-python's sdist, once per host.

    python -m bench.llama_server_build           # build if missing, print the binary's path
    python -m bench.llama_server_build --where   # print where it is (or would be), build nothing

Why this server: llama-cpp-python's server answers one request at a time, while llama.cpp's
own serves parallel slots with continuous batching, which is what someone who picks
llama.cpp runs (issue 29). Why from the sdist: it pins the very llama.cpp that the
`bench` extra's llama-cpp-python (and so the single-stream benchmark) runs, so both
llama.cpp figures come from one source tree.

The build is native (`GGML_NATIVE`: `-march=native`), so it is kept per CPU: the cache
folder's name holds the version and a digest of the CPU's model and flags. AMX is compiled
out (`-mno-amx-*`) unless `--amx` is given: ggml's AMX kernels die with a general
protection fault on this project's VMs (docs/bench.md, "Hosts with AMX"). Nothing here
downloads a prebuilt binary or web UI; only pip fetches the sdist.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERSION = "0.3.36"  # pyproject's `bench` extra pins the same llama-cpp-python
CACHE_DIR = ROOT / "bench" / ".cache" / "llama-server"
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def cmake_options(amx: bool) -> list[str]:
    """llama-server alone, static, native, no network features (HTTPS, downloaded UI)."""
    options = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DGGML_NATIVE=ON",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_BUILD_UI=OFF",
    ]
    if not amx:
        options += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
    return options


def host_tag(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """A digest of the CPU model and flags: a native build runs only where they match."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


def build_dir(version: str = VERSION, amx: bool = False, cache_dir: Path = CACHE_DIR) -> Path:
    return cache_dir / f"{version}-{host_tag()}{'-amx' if amx else ''}"


def server_binary(version: str = VERSION, amx: bool = False, cache_dir: Path = CACHE_DIR) -> Path:
    """Where the built `llama-server` is (or will be) for this host."""
    return build_dir(version, amx, cache_dir) / "bin" / "llama-server"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fetch_source(version: str, workdir: Path) -> Path:
    """The sdist through pip (its index, its cache), unpacked: the vendored llama.cpp folder."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
         f"llama-cpp-python=={version}", "-d", str(workdir)],
        check=True,
    )  # fmt: skip
    [sdist] = workdir.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(workdir, filter="data")
    source = workdir / sdist.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    if not (source / "CMakeLists.txt").exists():
        raise SystemExit(f"no vendored llama.cpp in {sdist.name}")
    return source


def build(version: str = VERSION, amx: bool = False, cache_dir: Path = CACHE_DIR, jobs: int | None = None) -> Path:
    """Builds `llama-server` unless this host's build is already cached; returns its path."""
    binary = server_binary(version, amx, cache_dir)
    if binary.exists():
        return binary
    target = build_dir(version, amx, cache_dir)
    started = time.monotonic()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-server-", dir=cache_dir) as scratch:
        work = Path(scratch)
        source = fetch_source(version, work)
        build_tree = work / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        options = cmake_options(amx)
        subprocess.run(["cmake", "-S", str(source), "-B", str(build_tree), *generator, *options], check=True)
        jobs = jobs or len(os.sched_getaffinity(0))
        subprocess.run(["cmake", "--build", str(build_tree), "--target", "llama-server", "--parallel", str(jobs)], check=True)
        built = next(build_tree.rglob("llama-server"), None)
        if built is None or not built.is_file():
            raise SystemExit(f"the build made no llama-server under {build_tree}")
        (target / "bin").mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, target / "bin" / "llama-server")
    info = {
        "llama_cpp_python": version,
        "cmake_options": options,
        "host_tag": host_tag(),
        "built_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - started),
    }
    (target / "build-info.json").write_text(json.dumps(info, indent=1) + "\n")
    return binary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.llama_server_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default=VERSION, help="llama-cpp-python version whose vendored llama.cpp is built")
    parser.add_argument("--amx", action="store_true", help="keep ggml's AMX kernels (they fault on this project's VMs)")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: the CPUs allowed)")
    parser.add_argument("--where", action="store_true", help="print the binary's path and whether it exists; build nothing")
    args = parser.parse_args(argv)
    binary = server_binary(args.version, args.amx, args.cache_dir)
    if args.where:
        print(f"{binary} ({'built' if binary.exists() else 'not built'})")
        return 0 if binary.exists() else 1
    if not binary.exists():
        log(f"building llama-server {args.version} into {binary.parent.parent} (15+ minutes on 2 cores) ...")
    print(build(args.version, args.amx, args.cache_dir, args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
