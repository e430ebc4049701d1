"""When the disk refuses, the server answers 503 and acknowledges nothing it
could not persist; when the disk is back, it works again."""

import errno
import os
import subprocess
import tempfile

from twisted.internet import defer
from twisted.trial import unittest

from reflservd import store
from test.test_api import ServerCase


class JournalFailureTests(ServerCase):

    def failWrites(self):
        writer = self.server.journal._writer

        def refuse(fd, data, offset):
            raise OSError(errno.ENOSPC, "No space left on device")

        original = writer._pwrite
        writer._pwrite = refuse
        return lambda: setattr(writer, "_pwrite", original)

    @defer.inlineCallbacks
    def test_journal_refusing_gives_503_and_the_job_does_not_exist(self):
        _, kept, _ = yield self.submit(name="kept")
        restore = self.failWrites()
        code, body, _ = yield self.submit(name="lost")
        self.assertEqual(code, 503, body)
        self.assertIn("journal", body["error"])
        code, listing, _ = yield self.call("GET", "/api/v1/jobs")
        self.assertEqual([j["name"] for j in listing["jobs"]], ["kept"])
        code, body, _ = yield self.lease()
        self.assertEqual(code, 503)
        self.assertEqual(self.server.queue.get(kept["id"]).status, "PENDING")
        restore()
        code, again, _ = yield self.submit(name="after")
        self.assertEqual(code, 201)
        yield self.stopServer()
        yield self.startServer()
        code, listing, _ = yield self.call("GET", "/api/v1/jobs")
        self.assertEqual([j["name"] for j in listing["jobs"]], ["after", "kept"])
        self.assertEqual([j["status"] for j in listing["jobs"]], ["PENDING", "PENDING"])


class StoreSyncFailureTests(ServerCase):

    @defer.inlineCallbacks
    def test_a_store_that_cannot_be_synced_gives_503_and_the_job_does_not_exist(self):
        """The submit's files are made durable (syncfs) before its record is
        written; when that sync fails (EIO) the submit is refused with 503 and
        the job is not there, before or after a restart."""
        _, kept, _ = yield self.submit(name="kept")

        def refuse(fd):
            raise OSError(errno.EIO, "Input/output error")

        original = store._syncfs
        store._syncfs = refuse
        try:
            code, body, _ = yield self.submit(name="lost")
        finally:
            store._syncfs = original
        self.assertEqual(code, 503, body)
        self.assertIn("job files", body["error"])
        code, listing, _ = yield self.call("GET", "/api/v1/jobs")
        self.assertEqual([j["name"] for j in listing["jobs"]], ["kept"])
        code, again, _ = yield self.submit(name="after")
        self.assertEqual(code, 201, again)
        yield self.stopServer()
        yield self.startServer()
        code, listing, _ = yield self.call("GET", "/api/v1/jobs")
        self.assertEqual([j["name"] for j in listing["jobs"]], ["after", "kept"])


class FullDiskTests(ServerCase):
    """A real, small tmpfs that fills up (needs root to mount)."""

    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("mounting a small tmpfs needs root")
        self.mountPoint = tempfile.mkdtemp(prefix="reflservd-full-")
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", self.mountPoint], check=True)
        self.addCleanup(os.rmdir, self.mountPoint)
        self.addCleanup(subprocess.run, ["umount", "-l", self.mountPoint], check=True)
        self.stateDir = os.path.join(self.mountPoint, "state")
        os.makedirs(self.stateDir)
        self.maxUpload = 8 << 20
        return self.startServer()

    @defer.inlineCallbacks
    def test_full_disk_refuses_with_503_and_recovers(self):
        _, kept, _ = yield self.submit(name="kept")
        filler = os.path.join(self.mountPoint, "filler")
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass
        # Written on the reactor thread (small) and in the store's pool (big): both refused.
        code, body, _ = yield self.submit(name="small")
        self.assertEqual(code, 503, body)
        code, body, _ = yield self.submit(name="too much", files={"model.py": b"x" * 300_000})
        self.assertEqual(code, 503, body)
        code, listing, _ = yield self.call("GET", "/api/v1/jobs")
        self.assertEqual([j["name"] for j in listing["jobs"]], ["kept"])
        os.unlink(filler)
        code, body, _ = yield self.submit(name="later")
        self.assertEqual(code, 201, body)
