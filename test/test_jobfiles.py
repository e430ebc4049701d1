"""Reading what a fit left (reflworkerd.jobfiles), on real files of every kind.

Each kind of special file, a link in any component of the path, a hard link
and a file of another owner is refused with a message saying what was found,
without blocking (a FIFO is never opened for reading) and without reading
what a link points at; with ``openat2`` and with the chain of directory
descriptors the worker uses where the kernel has none. Root is needed for a
device node and for files of another owner.
"""

import os
import socket

import pytest

from reflworkerd import jobfiles, outcome

OTHER_UID = 61999
needsRoot = pytest.mark.skipif(os.geteuid() != 0, reason="device nodes and other owners need root")


@pytest.fixture(params=["openat2", "chain"])
def job(request, tmp_path, monkeypatch):
    """A job directory beside another job's, read with openat2 or with the chain."""
    if request.param == "chain":
        monkeypatch.setattr(jobfiles, "_openat2Works", False)
    else:
        monkeypatch.setattr(jobfiles, "_openat2Works", None)
    other = tmp_path / "jobs" / "2"
    (other / "results").mkdir(parents=True)
    (other / "results" / "session.h5").write_bytes(b"the other job's session")
    mine = tmp_path / "jobs" / "1"
    (mine / "results").mkdir(parents=True)
    (mine / "results" / "fit.par").write_bytes(b"thickness 100\n")
    yield mine, other
    if request.param == "openat2":
        assert jobfiles._openat2Works is True, "openat2 was not used"


def refused(jobDir, relative):
    with pytest.raises(jobfiles.UnsafeFile) as caught:
        jobfiles.openFile(str(jobDir), relative).close()
    return str(caught.value)


def test_a_regular_file_of_the_fit_is_read(job):
    """A plain file with one link, of the fit's uid, is read, up to its size when opened."""
    mine, _ = job
    with jobfiles.openFile(str(mine), "results/fit.par") as f:
        assert (f.size, f.read(0, 100), f.read(10, 100)) == (14, b"thickness 100\n", b"100\n")


def test_special_files_are_refused_without_blocking(job):
    """FIFO, socket and directory are named, and a FIFO with no writer does not block."""
    mine, _ = job
    os.mkfifo(str(mine / "results" / "session.h5"))
    assert refused(mine, "results/session.h5") == "results/session.h5 is a FIFO, not a regular file"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(mine / "results" / "sock"))
        assert refused(mine, "results/sock") == "results/sock is a socket, not a regular file"
    (mine / "results" / "dir").mkdir()
    assert refused(mine, "results/dir") == "results/dir is a directory, not a regular file"


@needsRoot
def test_a_device_node_is_refused_unopened(job):
    """A character device (here a copy of /dev/null's numbers) is named and never opened."""
    mine, _ = job
    os.mknod(str(mine / "results" / "tty"), 0o600 | 0o020000, os.makedev(1, 3))
    assert refused(mine, "results/tty") == "results/tty is a character device, not a regular file"


def test_links_in_any_component_are_refused(job):
    """A symlink as the file, as the results directory, or as a directory further
    up is refused and names the link; the other job's file is never read."""
    mine, other = job
    os.symlink(str(other / "results" / "session.h5"), str(mine / "results" / "session.h5"))
    assert refused(mine, "results/session.h5") == "results/session.h5 is a symbolic link"
    os.rename(str(mine / "results"), str(mine / "results.moved"))
    os.symlink(str(other / "results"), str(mine / "results"))
    assert refused(mine, "results/session.h5") == "results is a symbolic link"
    os.symlink("../2", str(mine / "up"))
    assert refused(mine, "up/results/session.h5") == "up is a symbolic link"
    assert refused(mine, "../2/results/session.h5").endswith("is not a plain path inside the job directory")
    (mine / "plain").write_bytes(b"x")
    assert refused(mine, "plain/file") == "plain is a regular file, not a directory"


def test_hard_links_and_other_owners_are_refused(job):
    """A file with a second link (one may be outside the job) is refused."""
    mine, _ = job
    os.link(str(mine / "results" / "fit.par"), str(mine / "results" / "linked.par"))
    assert refused(mine, "results/linked.par") == "results/linked.par has 2 hard links"


@needsRoot
def test_a_file_of_another_uid_is_refused(job):
    """A file the fit's uid does not own (the worker's, root's) is refused."""
    mine, _ = job
    os.chown(str(mine / "results" / "fit.par"), OTHER_UID, OTHER_UID)
    assert refused(mine, "results/fit.par") == "results/fit.par is owned by uid %d, not the fit's uid 0" % OTHER_UID
    with jobfiles.openFile(str(mine), "results/fit.par", uid=OTHER_UID) as f:
        assert f.size == 14


def test_a_missing_file_is_not_found(job):
    mine, _ = job
    with pytest.raises(FileNotFoundError):
        jobfiles.openFile(str(mine), "results/absent")


def test_scan_names_everything_refused_and_keeps_the_rest(job):
    """scanResults keeps the plain files and says, for each other entry, what it is."""
    mine, other = job
    results = mine / "results"
    os.mkfifo(str(results / "fifo"))
    os.symlink(str(other / "results" / "session.h5"), str(results / "session.h5"))
    (results / "sub").mkdir()
    found = jobfiles.scanResults(str(mine))
    assert found.names == ["fit.par"]
    assert sorted(found.unsafe) == ["results/fifo is a FIFO, not a regular file",
                                    "results/session.h5 is a symbolic link",
                                    "results/sub is a directory, not a regular file"]
    os.rename(str(results), str(mine / "moved"))
    os.symlink(str(other / "results"), str(results))
    assert jobfiles.scanResults(str(mine)).unsafe == ["results is a symbolic link"]


def test_outcome_of_special_files_and_deep_nesting_is_refused(job):
    """readOutcome refuses a FIFO (without blocking), a directory, and JSON nested
    deeper than the bound (no RecursionError reaches the caller)."""
    mine, _ = job
    os.mkfifo(str(mine / outcome.OUTCOME_NAME))
    with pytest.raises(jobfiles.UnsafeFile, match="is a FIFO"):
        outcome.read(str(mine))
    os.unlink(str(mine / outcome.OUTCOME_NAME))
    (mine / outcome.OUTCOME_NAME).mkdir()
    with pytest.raises(jobfiles.UnsafeFile, match="is a directory"):
        outcome.read(str(mine))
    os.rmdir(str(mine / outcome.OUTCOME_NAME))
    (mine / outcome.OUTCOME_NAME).write_bytes(b"[" * 200000)
    with pytest.raises(jobfiles.UnsafeFile, match="nested deeper than 32 levels"):
        outcome.read(str(mine))


def test_loadJSON_bounds_size_and_depth():
    """Depth is measured without the parser (brackets in strings do not count)."""
    assert jobfiles.loadJSON(b'{"a": [[1], {"b": "[[[[[[["}]}', 100, maxDepth=3) == {"a": [[1], {"b": "[[[[[[["}]}
    with pytest.raises(ValueError, match="nested deeper than 2 levels"):
        jobfiles.loadJSON(b'{"a": [[1]]}', 100, maxDepth=2)
    with pytest.raises(ValueError, match="more than the 10 allowed"):
        jobfiles.loadJSON(b'"' + b"x" * 20 + b'"', 10)
    with pytest.raises(ValueError, match="nested deeper"):
        jobfiles.loadJSON(b"{" * 10**6, 10**7)
    with pytest.raises(ValueError, match="not JSON"):
        jobfiles.loadJSON(b"1" * 5000, 10**7)


def test_cleanProgress_keeps_typed_fields_only():
    """Progress leaves the worker as step, chisq, parameters (at most 200, labels of
    at most 200 characters, finite numbers) and elapsed; nothing else."""
    many = {"p%d" % n: float(n) for n in range(300)}
    many.update({"x" * 201: 1.0, "bad": "text", "inf": float("inf")})
    cleaned = jobfiles.cleanProgress({"step": 3.0, "chisq": "low", "parameters": many, "elapsed": -1,
                                      "confinement": "apparmor", "trace": "x" * 10**6})
    assert set(cleaned) == {"step", "chisq", "parameters", "elapsed"}
    assert cleaned["step"] == 3 and cleaned["chisq"] is None and cleaned["elapsed"] == 0.0
    assert list(cleaned["parameters"]) == ["p%d" % n for n in range(200)]
    assert jobfiles.cleanProgress({"step": "3"}) is None
    assert jobfiles.cleanProgress({"step": True}) is None
    assert jobfiles.cleanProgress([1]) is None
    assert jobfiles.cleanProgress({"step": 1, "chisq": 2, "parameters": {"a": 1}, "elapsed": 0.5}) == {
        "step": 1, "chisq": 2.0, "parameters": {"a": 1.0}, "elapsed": 0.5}
