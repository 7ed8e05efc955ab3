"""The CPU Docker image, built from the Dockerfile as it is and run for real: `make test-image`.

There is no Docker engine on these machines, so the image is built and run with Debian's buildah (daemonless, as
root, `overlay` storage (`vfs` where the kernel refuses an overlay mount), `chroot` isolation, host network). Docker
Hub cannot be reached either, so the Dockerfile's CPU base is replaced through its `CPU_BASE` build argument by a
local Debian 12 image: a `debootstrap --variant=minbase bookworm` root file system with python3 (3.11, as in
python:3.11-slim-bookworm), python3-venv and ca-certificates, cached in buildah's storage between runs. pip inside
the build uses this machine's own pip settings (index, wheel folders, constraints, certificate), passed in as one
pip.conf plus read-only mounts of the files and folders it names.

Then, in containers of the built image, with the image's own user, environment and entry point:
`retrieval db upgrade` against a real PostgreSQL server on loopback, `retrieval index build` of a small folder
under the /data volume, `retrieval serve`, the image's HEALTHCHECK command until it passes, and a query-by-image
over loopback whose rank-1 result has the query's class. Also checked: the server runs as the non-root user, and
nothing outside /data is written. Build time, image size and cold start are printed (run with -s to see them).

Not collected by a plain `pytest` (the file name has no test_ prefix): the build takes minutes and GBs of disk.
Skipped, with the reason, where buildah cannot run (not installed, not root); under CI=true that is a failure.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import CLASS_COLOURS, class_image, jpeg_bytes
from tests.postgres import free_port

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI") == "true"
# buildah's storage (the cached base image lives here between runs) and scratch space.
WORK = Path(os.environ.get("RETRIEVAL_IMAGE_TEST_DIR", "/var/tmp/retrieval-image-test"))
# Free disk the run needs at its peak under WORK, measured (docs/deployment.md): while the final stage is committed,
# the builder's venv, the runtime stage's copy of it, the layer's tar blob and the layer it unpacks to (about 6 GB
# each) all exist at once, with either storage driver.
NEEDED_GB = 31
MIRROR = os.environ.get("RETRIEVAL_IMAGE_TEST_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# Tagged by its package list, so a changed list makes a new base instead of reusing the cached one.
BASE_IMAGE = ("localhost/retrieval-test-base:bookworm-"
              + hashlib.sha256(" ".join(BASE_PACKAGES).encode()).hexdigest()[:8])
IMAGE = "localhost/image-retrieval:cpu-test"
# To re-run the container checks on an image already in WORK's storage, without building (and without removing it).
PREBUILT = os.environ.get("RETRIEVAL_IMAGE_TEST_IMAGE")
PER_CLASS = 5
# Files the container runtime itself writes into the root file system when it starts a container (Docker does the
# same); the app's processes never touch them.
RUNTIME_FILES = {"etc/hosts", "etc/resolv.conf", "etc/hostname", "run/.containerenv"}


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"the image test must run in CI: {reason}")
    pytest.skip(f"cannot build or run the image here: {reason}")


def storage_driver() -> str:
    """overlay where the kernel mounts one here (root with overlayfs), else vfs; RETRIEVAL_IMAGE_TEST_STORAGE picks."""
    chosen = os.environ.get("RETRIEVAL_IMAGE_TEST_STORAGE")
    if chosen:
        return chosen
    with tempfile.TemporaryDirectory(dir=WORK, prefix="overlay-probe-") as probe:
        for name in ("lower", "upper", "work", "merged"):
            Path(probe, name).mkdir()
        options = f"lowerdir={probe}/lower,upperdir={probe}/upper,workdir={probe}/work"
        try:
            mounted = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, f"{probe}/merged"],
                                     capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            mounted = False
        if mounted:
            subprocess.run(["umount", f"{probe}/merged"], timeout=30)
    return "overlay" if mounted else "vfs"


class Buildah:
    """buildah with its own storage under WORK, so nothing is shared with other users of buildah on the machine
    (one storage folder per driver: containers/storage refuses a folder made by another driver)."""

    def __init__(self, executable: str, driver: str) -> None:
        self.driver = driver
        self.prefix = [executable, "--root", str(WORK / f"storage-{driver}"), "--runroot", str(WORK / "run"),
                       "--storage-driver", driver]

    def argv(self, *args: str) -> list[str]:
        return [*self.prefix, *args]

    def __call__(self, *args: str, timeout: float = 300, log: Path | None = None) -> str:
        if log is None:
            result = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout)
            output = result.stdout + result.stderr
        else:
            with log.open("w") as out:
                result = subprocess.run(self.argv(*args), stdout=out, stderr=subprocess.STDOUT, text=True,
                                        timeout=timeout)
            output = log.read_text()
        assert result.returncode == 0, f"buildah {' '.join(args[:2])} failed:\n{output[-6000:]}"
        return result.stdout if log is None else output


@pytest.fixture(scope="module")
def buildah() -> Buildah:
    executable = shutil.which("buildah")
    if executable is None:
        unavailable("buildah is not installed (scripts/setup.sh --image installs it)")
    if shutil.which("debootstrap") is None:
        unavailable("debootstrap is not installed (scripts/setup.sh --image installs it)")
    if os.geteuid() != 0:
        unavailable("buildah with chroot isolation needs root here")
    WORK.mkdir(parents=True, exist_ok=True)
    # The single vfs storage folder of earlier versions of this test: GBs that would count against the check below.
    shutil.rmtree(WORK / "storage", ignore_errors=True)
    driver = storage_driver()
    free_gb = shutil.disk_usage(WORK).free / 1e9
    if free_gb < NEEDED_GB:
        # Not a missing tool but a machine too full today: a build that fills the disk half-way proves nothing about
        # the Dockerfile and leaves the machine without space, so this skips (with the figures) even under CI.
        pytest.skip(f"the image build needs about {NEEDED_GB} GB free under {WORK}; {free_gb:.1f} GB are "
                    "(RETRIEVAL_IMAGE_TEST_DIR picks another disk)")
    print(f"\nbuildah storage: {driver} under {WORK}, {free_gb:.1f} GB free", flush=True)
    tool = Buildah(executable, driver)
    tool("info", timeout=60)
    return tool


@pytest.fixture(scope="module")
def base_image(buildah: Buildah) -> str:
    """The local stand-in for python:3.11-slim-bookworm, made once per machine from Debian's packages."""
    if buildah("images", "--quiet", "--filter", f"reference={BASE_IMAGE}").strip():
        return BASE_IMAGE
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=WORK, prefix="rootfs-") as scratch:
        rootfs = Path(scratch) / "rootfs"
        made = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                               "bookworm", str(rootfs), MIRROR], capture_output=True, text=True, timeout=900)
        assert made.returncode == 0, f"debootstrap failed:\n{(made.stdout + made.stderr)[-4000:]}"
        subprocess.run(["rm", "-rf", str(rootfs / "var/cache/apt/archives"), str(rootfs / "var/lib/apt/lists")],
                       check=True)
        container = buildah("from", "scratch").strip()
        try:
            mountpoint = buildah("mount", container).strip()
            subprocess.run(f"tar -C {rootfs} -c . | tar -C {mountpoint} -x -p --numeric-owner", shell=True,
                           check=True, timeout=600)
            buildah("umount", container)
            buildah("config", "--cmd", "/bin/bash", container)
            buildah("commit", "--format", "docker", container, BASE_IMAGE, timeout=600)
        finally:
            buildah("rm", container)
    print(f"\nbase image {BASE_IMAGE}: made in {time.monotonic() - started:.0f} s", flush=True)
    return BASE_IMAGE


def host_pip_settings(directory: Path) -> tuple[Path, list[str]]:
    """This machine's pip settings (config files and PIP_* environment, the environment winning, as in pip) as one
    pip.conf, and the files and folders its values name, to mount read-only at the same paths in the build."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=True, timeout=60).stdout.splitlines()
    from_files, from_env = {}, {}
    for line in listed:
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if section == ":env:":
            from_env[("global", name)] = ast.literal_eval(value)
        else:
            from_files[(section, name)] = ast.literal_eval(value)
    settings = {**from_files, **from_env}
    mounts: set[Path] = set()
    for value in settings.values():
        for word in value.split():
            path = Path(word.removeprefix("file://")) if word.startswith(("/", "file:///")) else None
            if path is None or not path.exists():
                continue
            # A file:// "simple" index links to its files as ../../files/...: mount the whole index tree.
            mounts.add(path.parent if path.is_dir() and path.name == "simple" else path)
    sections: dict[str, list[str]] = {}
    for (section, name), value in sorted(settings.items()):
        sections.setdefault(section, []).append(f"{name} = {value}")
    conf = directory / "pip.conf"
    conf.write_text("".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items()))
    volumes = [f"{conf}:/etc/pip.conf:ro"] + [f"{p}:{p}:ro" for p in sorted(mounts)]
    return conf, volumes


def image_config(buildah: Buildah, image: str) -> dict:
    return json.loads(buildah("inspect", "--type", "image", image))["Docker"]["config"]


def image_size(buildah: Buildah, image: str) -> str:
    """The uncompressed size of all layers, as buildah (and `docker images`) reports it."""
    return json.loads(buildah("images", "--json", image))[0]["size"]


def remove_containers(buildah: Buildah, image: str) -> None:
    for container in buildah("containers", "--quiet", "--filter", f"ancestor={image}").split():
        buildah("rm", container)


@pytest.fixture(scope="module")
def image(buildah: Buildah, request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The CPU image, built from the repository's Dockerfile; removed (with its containers) at the end."""
    if PREBUILT:
        yield PREBUILT
        remove_containers(buildah, PREBUILT)
        return
    base_image = request.getfixturevalue("base_image")
    scratch = tmp_path_factory.mktemp("build")
    _, volumes = host_pip_settings(scratch)
    # VARIANT is passed although it is the default: buildah 1.28 resolves `FROM python-${VARIANT}` to the stage of
    # that name only for arguments given on its command line.
    args = ["bud", "--isolation", "chroot", "--format", "docker", "--build-arg", "VARIANT=cpu",
            "--build-arg", f"CPU_BASE={base_image}", "--tag", IMAGE]
    for volume in volumes:
        args += ["--volume", volume]
    started = time.monotonic()
    log = scratch / "build.log"
    try:
        output = buildah(*args, str(REPO), timeout=3600, log=log)
        seconds = time.monotonic() - started
        assert "default embedder dim" in output, "the offline smoke test of the builder stage ran"
        print(f"\nimage {IMAGE}: built in {seconds:.0f} s, {image_size(buildah, IMAGE)}", flush=True)
        yield IMAGE
    finally:
        remove_containers(buildah, IMAGE)
        remove_containers(buildah, base_image)  # buildah bud leaves the working container of the empty base stage
        if buildah("images", "--quiet", "--filter", f"reference={IMAGE}").strip():
            buildah("rmi", "--force", IMAGE)
        buildah("rmi", "--prune")  # the builder stage's leftovers; the base image stays cached


@pytest.fixture(scope="module")
def container(buildah: Buildah, image: str) -> str:
    """One working container for every role, as compose runs them all from this image (vfs copies the whole image
    for each container: a minute or more). /dev/shm as big as compose's `shm_size`, for DataLoader workers."""
    started = time.monotonic()
    container = buildah("from", "--pull=never", "--shm-size", "1g", image, timeout=900).strip()
    print(f"\nworking container: made in {time.monotonic() - started:.0f} s", flush=True)
    # buildah 1.28's `run` mounts an anonymous volume for the image's VOLUME over a `--volume` given for the same
    # path; dropping the declaration from this working container (not from the image) lets the bind mount through,
    # as `docker run -v ...:/data` does.
    buildah("config", "--volume", "/data-", container)
    return container


def corpus(root: Path) -> None:
    for label in CLASS_COLOURS:
        (root / label).mkdir(parents=True)
        for n in range(PER_CLASS):
            class_image(label, seed=1000 * list(CLASS_COLOURS).index(label) + n).save(root / label / f"{n}.jpg",
                                                                                     quality=92)


def snapshot(rootfs: Path) -> dict[str, tuple[int, ...]]:
    """Every path of a container's root file system except /data, /proc, /sys, /dev, with what a write changes
    (a directory's own mtime is left out: an entry added or removed in it shows up as that entry)."""
    seen: dict[str, tuple[int, ...]] = {}
    skip = {"data", "proc", "sys", "dev"}
    for directory, dirs, files in os.walk(rootfs):
        if Path(directory) == rootfs:
            dirs[:] = [d for d in dirs if d not in skip]
        for name in dirs:
            st = Path(directory, name).lstat()
            seen[str(Path(directory, name).relative_to(rootfs))] = (st.st_mode, st.st_uid)
        for name in files:
            st = Path(directory, name).lstat()
            seen[str(Path(directory, name).relative_to(rootfs))] = (st.st_mtime_ns, st.st_size, st.st_mode,
                                                                    st.st_uid)
    return seen


def descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent]
        found += children
        frontier += children
    return found


def uids_of(pid: int) -> tuple[int, ...]:
    line = next(s for s in Path(f"/proc/{pid}/status").read_text().splitlines() if s.startswith("Uid:"))
    return tuple(int(u) for u in line.split()[1:])


def test_image_config(buildah: Buildah, image: str, container: str) -> None:
    config = image_config(buildah, image)
    assert config["Entrypoint"] == ["retrieval"] and config["Cmd"] == ["serve"]
    user = config["User"]
    assert user.split(":")[0] not in ("", "0", "root"), f"the image runs as {user!r}"
    # The numeric user exists in the image, with /data as its home.
    passwd = Path(buildah("mount", container).strip(), "etc/passwd").read_text()
    entry = next(line.split(":") for line in passwd.splitlines() if line.split(":")[2] == user.split(":")[0])
    assert entry[0] == "retrieval" and entry[5] == "/data"
    assert config["Healthcheck"]["Test"][0] == "CMD", "the HEALTHCHECK survived the build (docker format)"
    assert "/data" in config["Volumes"] and config["WorkingDir"] == "/data"
    assert "HF_HUB_OFFLINE=1" in config["Env"] and "RETRIEVAL_DATA_DIR=/data" in config["Env"]


@pytest.mark.slow
def test_image_migrates_indexes_serves_and_answers_a_query(buildah: Buildah, image: str, container: str,
                                                           postgres_server, tmp_path: Path) -> None:
    config = image_config(buildah, image)
    user = config["User"]
    uid, gid = (int(x) for x in user.split(":"))
    data = tmp_path / "data"
    corpus(data / "corpus")
    for path in [data, *data.rglob("*")]:  # owned like a new named volume on the image's /data
        os.chown(path, uid, gid)
    database_url = postgres_server.create_database()
    port = free_port()
    env = {"RETRIEVAL_DATABASE_URL": database_url, "RETRIEVAL_PORT": str(port)}

    rootfs = Path(buildah("mount", container).strip())
    before = snapshot(rootfs)

    def run(*command: str, as_user: str = user) -> list[str]:
        argv = ["run", "--isolation", "chroot", "--network", "host", "--user", as_user, "--volume", f"{data}:/data"]
        for key, value in env.items():
            argv += ["--env", f"{key}={value}"]
        return buildah.argv(*argv, container, "--", *command)

    def role(*args: str, timeout: float) -> str:
        done = subprocess.run(run(*config["Entrypoint"], *args), capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"retrieval {' '.join(args)} failed:\n{(done.stdout + done.stderr)[-4000:]}"
        return done.stdout + done.stderr

    # migrate, then the batch indexer over the mounted folder.
    assert "database at revision" in role("db", "upgrade", timeout=120)
    built = role("index", "build", "/data/corpus", timeout=600)
    assert (data / "indexes").is_dir(), built

    # api: the image's default command, timed from start to the HEALTHCHECK passing and to /readyz saying ready.
    health = config["Healthcheck"]["Test"][1:]
    log = (tmp_path / "serve.log").open("w")
    started = time.monotonic()
    server = subprocess.Popen(run(*config["Entrypoint"], *config["Cmd"]), stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        healthy_after = ready_after = None
        deadline = started + 300
        while time.monotonic() < deadline and ready_after is None:
            assert server.poll() is None, f"retrieval serve exited:\n{(tmp_path / 'serve.log').read_text()[-4000:]}"
            if healthy_after is None:
                if subprocess.run(run(*health), capture_output=True, timeout=30).returncode == 0:
                    healthy_after = time.monotonic() - started
            else:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                        ready_after = time.monotonic() - started
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        assert healthy_after is not None, "the image's HEALTHCHECK never passed"
        assert ready_after is not None, "/readyz never said ready"
        print(f"\ncold start: HEALTHCHECK passes after {healthy_after:.1f} s, /readyz ready after "
              f"{ready_after:.1f} s", flush=True)

        # A held-out image of each class (not in the corpus) finds its own class first.
        for index, label in enumerate(CLASS_COLOURS):
            query = jpeg_bytes(class_image(label, seed=1000 * index + 500))
            response = httpx.post(f"http://127.0.0.1:{port}/v1/search", data={"k": "5"}, timeout=60,
                                  files={"file": ("query.jpg", query, "image/jpeg")})
            assert response.status_code == 200, response.text
            assert response.json()["results"][0]["label"] == label, response.text

        # The server process runs as the image's non-root user (real, effective, saved and file-system uid).
        servers = [p for p in descendants(server.pid)
                   if b"serve" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")]
        assert servers, "found the retrieval serve process"
        for pid in servers:
            assert set(uids_of(pid)) == {uid}, f"pid {pid} runs as {uids_of(pid)}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()

    # The image's user can write nowhere in the image outside /data ...
    denied = subprocess.run(run("python", "-c", "open('/opt/venv/written-by-the-app', 'w')"), capture_output=True,
                            text=True, timeout=60)
    assert denied.returncode != 0 and "PermissionError" in denied.stderr, denied.stdout + denied.stderr
    # ... and no role wrote anything outside /data (the runtime's own files aside); in /data all is the user's.
    after = snapshot(rootfs)
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert set(changed) <= RUNTIME_FILES, f"written outside /data: {changed[:20]}"
    assert {p.stat().st_uid for p in data.rglob("*")} == {uid}
    buildah("umount", container)
