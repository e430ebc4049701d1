"""``reflq view``'s checks, without a server or a webview (the real viewer
serving a real session is in test_provenance_e2e.py)."""

import pytest

from reflservd import viewer
from reflservd.client import Client, ClientError
from reflservd.clientfiles import KeyStore


def test_a_refl1d_without_a_webview_is_named_with_what_to_install(monkeypatch):
    monkeypatch.setattr(viewer, "WEBVIEW_MODULES", viewer.WEBVIEW_MODULES + ("refl1d.no_such_webview",))
    with pytest.raises(viewer.ViewerUnavailable, match=r"refl1d\.no_such_webview is missing.*refl1d\[webview\]"):
        viewer.checkWebview()


def test_the_installed_refl1d_offers_its_webview():
    viewer.checkWebview()


def test_a_job_not_submitted_from_here_is_opened_only_with_trust(tmp_path):
    """Without its key, the session (which rebuilds objects its fit chose) is
    not even downloaded; the refusal says why and how."""
    client = Client("http://127.0.0.1:9", keys=KeyStore(str(tmp_path / "keys.json")))

    class Job:
        id = 7

        def files(self):
            raise AssertionError("nothing is asked of the server")

    job = Job()
    job.client = client
    with pytest.raises(ClientError, match="not submitted from here.*--trust"):
        viewer.fetchSession(job, str(tmp_path))


def test_the_webview_opens_the_session_read_only_on_localhost():
    command = viewer.webviewCommand("/tmp/x/session.h5", port=8123, browser=False)
    assert command[1:] == ["-m", "refl1d.webview.server", "--read-session", "/tmp/x/session.h5",
                           "--port", "8123", "--headless"]
    assert "--session" not in command and "--external" not in command
